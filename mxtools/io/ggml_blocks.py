"""GGUF block quantization that writes exactly the bytes llama.cpp's quantizer writes.

The arithmetic is C (mxtools/native/quants.c for the legacy and K-quant types, iq4.c, iq3.c, iq2.c and iq1.c for
the i-quants: every type of SUPPORTED, with and without an importance matrix where ggml allows both, in ggml's
float evaluation order). This module validates the input, splits the matrix into row chunks and runs them on
`torch.get_num_threads()` threads (the C calls release the GIL).
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from mxtools import native

from .gguf_format import tensor_nbytes

__all__ = ["NEEDS_IMATRIX", "SUPPORTED", "quantize"]

# The GGML types the native quantizer writes -> (values per block, bytes per block), from gguf-py's table.
SUPPORTED: dict[Q, tuple[int, int]] = {t: GGML_QUANT_SIZES[t] for t in (
    Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_XXS, Q.IQ3_S, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_S, Q.IQ1_M)}

# Types ggml's quantizer refuses without an importance matrix (ggml_quantize_requires_imatrix; llama-quantize
# refuses more: quant.mixes.NEEDS_IMATRIX).
NEEDS_IMATRIX = frozenset({Q.IQ2_XXS, Q.IQ2_XS, Q.IQ1_S})

CHUNK_VALUES = 1 << 18  # values per work item (1 MiB of float32): small enough to balance two threads


_SIXTEEN_BIT = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _as_matrix(x) -> tuple[np.ndarray, str]:
    """A 2-D C-contiguous numpy view (or copy) of a torch tensor or numpy array and its row format: bf16 and f16
    tensors stay 16-bit (uint16 bits; the C widens one row at a time), anything else becomes float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in _SIXTEEN_BIT:
            src = _SIXTEEN_BIT[x.dtype]
            x = x.contiguous().view(torch.uint16).numpy()
        else:
            src, x = "f32", x.to(torch.float32).contiguous().numpy()
    else:
        src, x = "f32", np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [rows, n] matrix, got shape {tuple(x.shape)}; "
                         "quantize 3-D expert tensors one expert slice at a time")
    return x, src


def _check(x: np.ndarray, qtype, imatrix) -> np.ndarray | None:
    """Validate the type, row length and imatrix once, before any work; returns the imatrix as float32."""
    if qtype not in SUPPORTED:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"GGML type {getattr(qtype, 'name', qtype)} cannot be quantized here; supported: {names}")
    block = SUPPORTED[qtype][0]
    n = x.shape[1]
    if n == 0 or n % block:
        raise ValueError(f"{qtype.name} needs rows whose length is a multiple of {block}, "
                         f"got {n}; keep such tensors in F16/F32")
    if imatrix is None:
        if qtype in NEEDS_IMATRIX:
            raise ValueError(f"{qtype.name} needs an importance matrix (llama.cpp refuses to quantize it without one); "
                             "pass imatrix=")
        return None
    if isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().to("cpu", torch.float32).numpy()
    qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if qw.shape != (n,):
        raise ValueError(f"imatrix has {qw.size} values, the rows have {n}; pass one value per input column")
    if not np.isfinite(qw).all():
        raise ValueError("imatrix holds NaN or infinite values")
    return qw


def quantize(x: torch.Tensor, qtype: Q, imatrix: torch.Tensor | None = None, out: np.ndarray | None = None
             ) -> np.ndarray:
    """Quantize a [rows, n] matrix (float32, or bf16/f16 read as such) to GGML blocks, byte for byte as llama.cpp.

    imatrix (float32 [n], mean squared activation per input column) selects llama.cpp's importance
    weighted path (`quantize_*` with quant_weights); None selects `quantize_row_*_ref` (NEEDS_IMATRIX types refuse
    None). Q8_0 ignores it.
    Returns uint8 [rows, n // block_size * type_size] (`out` when given). Raises ValueError for an unsupported type, a
    row length that is not a multiple of the block size, a mismatched imatrix or non-finite input.
    """
    x, src = _as_matrix(x)
    qw = _check(x, qtype, imatrix)
    rows, n = x.shape
    shape = (rows, tensor_nbytes((n,), qtype))
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}")
    step = max(1, CHUNK_VALUES // n)

    def work(r0: int) -> None:
        try:
            native.quantize_rows(int(qtype), x[r0:r0 + step], src, out[r0:r0 + step], qw)
        except native.NonFiniteRow as exc:  # name the row in the whole matrix
            raise native.NonFiniteRow(exc.row + r0) from None

    starts = range(0, rows, step)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    if threads == 1:
        for r0 in starts:
            work(r0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, starts))
    return out
