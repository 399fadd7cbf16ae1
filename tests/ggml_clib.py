"""ctypes access to llama.cpp's own quantizer (libggml-base, shipped inside llama-cpp-python) for tests.

`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` is declared in ggml.h; it calls
`quantize_<type>` in ggml-quants.c, i.e. the `_ref` row quantizers when imatrix is NULL.
"""

import ctypes
import os
from pathlib import Path

import numpy as np

_LIB_NAMES = ("libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib")


def find_library() -> Path | None:
    """The ggml library that exports ggml_quantize_chunk: $MXTOOLS_GGML_LIB, else llama_cpp/lib."""
    override = os.environ.get("MXTOOLS_GGML_LIB")
    if override:
        return Path(override)
    try:
        import llama_cpp
    except ImportError:
        return None
    root = Path(llama_cpp.__file__).parent
    for name in _LIB_NAMES:
        for path in sorted(root.rglob(name)):
            return path
    return None


class GGML:
    """The C quantizer: `quantize(x, type_id, imatrix)` -> uint8 [rows, row_bytes]."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, self.lib.ggml_row_size(type_id, n)), dtype=np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        size = self.lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                            None if qw is None else qw.ctypes.data)
        if size != out.size:
            raise RuntimeError(f"ggml_quantize_chunk wrote {size} bytes, expected {out.size}")
        return out


def assert_same_rows(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Our encoded rows are llama.cpp's, byte for byte; the message names the first row that is not."""
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{what}: {bad.size} rows differ from llama.cpp, first row {bad[0]}"


def assert_encodes_like_llama_cpp(clib: GGML, qtype, x: np.ndarray, qw: np.ndarray | None, what: str) -> None:
    """mxtools' encoder (io.ggml_blocks.quantize) gives llama.cpp's bytes for rows x with importance weights qw."""
    import torch

    from mxtools.io.ggml_blocks import quantize

    ours = quantize(torch.from_numpy(x), qtype, None if qw is None else torch.from_numpy(qw))
    assert_same_rows(ours, clib.quantize(x, int(qtype), qw), f"{qtype.name} {what}")


def assert_rows_like_llama_cpp(clib: GGML, qtype, rows: dict, qw: np.ndarray | None, what: str) -> None:
    """assert_encodes_like_llama_cpp for every named set of rows."""
    for name, x in rows.items():
        assert_encodes_like_llama_cpp(clib, qtype, x, qw, f"{name} {what}")


def assert_threads_keep_bytes(clib: GGML, monkeypatch, types, x: np.ndarray, qw: np.ndarray | None,
                              chunk_rows: int) -> None:
    """Two threads over uneven chunks of `chunk_rows` rows still give llama.cpp's bytes for every type."""
    import torch

    from mxtools.io import ggml_blocks

    monkeypatch.setattr(ggml_blocks, "CHUNK_VALUES", chunk_rows * x.shape[1])
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for qtype in types:
            assert_encodes_like_llama_cpp(clib, qtype, x, qw, "threaded, chunked")
    finally:
        torch.set_num_threads(old)
