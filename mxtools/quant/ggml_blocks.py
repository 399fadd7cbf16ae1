"""GGUF block quantization that writes exactly the bytes llama.cpp's quantizer writes.

`quantize(x, qtype, imatrix)` splits the matrix into row chunks small enough to stay in cache and
quantizes them on `torch.get_num_threads()` threads (numpy releases the GIL inside its loops). The
per-type arithmetic lives in ggml_legacy (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), kquants (Q4_K, Q5_K, Q6_K)
and kquants_low (Q2_K, Q3_K), which register into SUPPORTED (ggml_registry) when imported. Numpy rather than torch because exactness needs C's left-to-right float
sums, which `np.add.reduce(axis=0)` gives and torch's reductions do not promise.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType

from mxtools.quant import ggml_legacy, kquants, kquants_low  # noqa: F401  (importing registers the types)
from mxtools.quant.ggml_registry import SUPPORTED, BlockType

__all__ = ["SUPPORTED", "quantize"]

CHUNK_VALUES = 1 << 16  # values per work item: ~10 float32 work buffers of this size stay in L2


def _as_matrix(x) -> np.ndarray:
    """A 2-D float32 C-contiguous numpy view (or copy) of a torch tensor or numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [rows, n] matrix, got shape {tuple(x.shape)}; "
                         "quantize 3-D expert tensors one expert slice at a time")
    return x


def _check(x: np.ndarray, qtype, imatrix) -> tuple[BlockType, np.ndarray | None]:
    """Validate the type, row length and imatrix once, before any work."""
    spec = SUPPORTED.get(qtype)
    if spec is None:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"GGML type {getattr(qtype, 'name', qtype)} cannot be quantized here; supported: {names}")
    n = x.shape[1]
    if n == 0 or n % spec.block_size:
        raise ValueError(f"{spec.qtype.name} needs rows whose length is a multiple of {spec.block_size}, "
                         f"got {n}; keep such tensors in F16/F32")
    if imatrix is None:
        return spec, None
    if isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().to("cpu", torch.float32).numpy()
    qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if qw.shape != (n,):
        raise ValueError(f"imatrix has {qw.size} values, the rows have {n}; pass one value per input column")
    if not np.isfinite(qw).all():
        raise ValueError("imatrix holds NaN or infinite values")
    return spec, qw


def quantize(x: torch.Tensor, qtype: GGMLQuantizationType, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """Quantize a float32 [rows, n] matrix to GGML blocks, byte for byte as llama.cpp does.

    imatrix (float32 [n], mean squared activation per input column) selects llama.cpp's importance
    weighted path (`quantize_*` with quant_weights); None selects `quantize_row_*_ref`. Q8_0 ignores it.
    Returns uint8 [rows, n // block_size * type_size]. Raises ValueError for an unsupported type, a row
    length that is not a multiple of the block size, a mismatched imatrix or non-finite input.
    """
    x = _as_matrix(x)
    spec, qw = _check(x, qtype, imatrix)
    rows, n = x.shape
    out = np.empty((rows, n // spec.block_size * spec.type_size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // n)

    def work(r0: int) -> None:
        chunk = x[r0:r0 + step]
        if not np.isfinite(chunk).all():  # checked per chunk: no full-size mask for a 14336 x 4096 matrix
            raise ValueError(f"rows {r0}..{r0 + len(chunk) - 1} hold NaN or infinite values; "
                             "llama.cpp would write meaningless blocks")
        with np.errstate(all="ignore"):  # inf/NaN intermediates of degenerate blocks mirror the C's
            out[r0:r0 + step] = spec.fn(chunk, qw).reshape(len(chunk), -1)

    starts = range(0, rows, step)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    if threads == 1:
        for r0 in starts:
            work(r0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, starts))
    return out
