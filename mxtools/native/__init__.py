"""mxtools' native kernels: GGML block quantizers and float casts in C (built by setup.py as mxtools.native._lib).

The shared object is loaded with ctypes, which releases the GIL for the duration of each call, so Python
threads that call these functions on different rows run in parallel.
"""
from __future__ import annotations

import ctypes
import importlib.util

import numpy as np

from ..errors import MxError

_c_void_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("mxtools.native._lib")
    if spec is None or spec.origin is None:
        raise MxError("mxtools' native kernels are not built; run `pip install -e .` (or `make install`)")
    lib = ctypes.CDLL(spec.origin)
    lib.mx_quantize_rows.restype = _i64
    lib.mx_quantize_rows.argtypes = [_int, _c_void_p, _c_void_p, _i64, _i64, _c_void_p]
    for name in ("mx_bf16_to_f16", "mx_f32_to_f16", "mx_bf16_to_f32", "mx_f32_to_f16_soft"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [_c_void_p, _c_void_p, _i64]
    return lib


LIB = _load()


def quantize_rows(type_id: int, x: np.ndarray, out: np.ndarray, imatrix: np.ndarray | None) -> None:
    """Quantize float32 rows x [r, n] (C-contiguous) into out (uint8 [r, row bytes]) as GGML type `type_id`."""
    rows, n = x.shape
    qw = None if imatrix is None else imatrix.ctypes.data
    done = LIB.mx_quantize_rows(type_id, x.ctypes.data, out.ctypes.data, rows, n, qw)
    if done != out.size:
        raise MxError(f"native quantizer wrote {done} bytes for GGML type {type_id}, expected {out.size}")


_CASTS = {("bf16", "f16"): "mx_bf16_to_f16", ("f32", "f16"): "mx_f32_to_f16", ("bf16", "f32"): "mx_bf16_to_f32"}
_NP = {"f16": np.uint16, "bf16": np.uint16, "f32": np.float32}


def cast(src: np.ndarray, src_type: str, dst_type: str, out: np.ndarray | None = None) -> np.ndarray:
    """Convert a contiguous array of `src_type` values ('bf16', 'f32') to `dst_type` ('f16', 'f32').

    Half and bfloat16 arrays are passed as their uint16 bits. Returns `out` (allocated when None).
    """
    fn = getattr(LIB, _CASTS[src_type, dst_type])
    src = np.ascontiguousarray(src)
    if out is None:
        out = np.empty(src.shape, dtype=_NP[dst_type])
    if out.size != src.size or not out.flags.c_contiguous:
        raise ValueError("cast needs a contiguous output of the same size")
    fn(src.ctypes.data, out.ctypes.data, src.size)
    return out
