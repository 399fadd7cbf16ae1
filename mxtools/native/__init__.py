"""mxtools' native kernels: GGML block quantizers and float casts in C (built by setup.py as mxtools.native._lib).

The shared object is loaded with ctypes, which releases the GIL for the duration of each call, so Python
threads that call these functions on different rows run in parallel.
"""
from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import torch

from ..errors import MxError

_c_void_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("mxtools.native._lib")
    if spec is None or spec.origin is None:
        raise MxError("mxtools' native kernels are not built; run `pip install -e .` (or `make install`)")
    lib = ctypes.CDLL(spec.origin)
    lib.mx_quantize_rows.restype = _i64
    lib.mx_quantize_rows.argtypes = [_int, _int, _c_void_p, _c_void_p, _i64, _i64, _c_void_p,
                                     ctypes.POINTER(_i64)]
    for name in ("mx_bf16_to_f16", "mx_f32_to_f16", "mx_bf16_to_f32", "mx_f32_to_f16_soft"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [_c_void_p, _c_void_p, _i64]
    return lib


LIB = _load()


class NonFiniteRow(ValueError):
    """A row to quantize holds inf or NaN; `row` is its index in the rows passed."""

    def __init__(self, row: int):
        super().__init__(f"row {row} holds NaN or infinite values; llama.cpp would write meaningless blocks")
        self.row = row


SOURCE_TYPES = {"f32": 0, "bf16": 1, "f16": 2}  # row formats mx_quantize_rows reads (16-bit ones as uint16 bits)


def quantize_rows(type_id: int, x: np.ndarray, src: str, out: np.ndarray, imatrix: np.ndarray | None) -> None:
    """Quantize rows x [r, n] (C-contiguous; float32, or uint16 bits of bf16/f16 as `src` says) into out
    (uint8 [r, row bytes]) as GGML type `type_id`. Raises ValueError naming the first row with inf or NaN."""
    rows, n = x.shape
    bad = _i64(-1)
    qw = None if imatrix is None else imatrix.ctypes.data
    done = LIB.mx_quantize_rows(type_id, SOURCE_TYPES[src], x.ctypes.data, out.ctypes.data, rows, n, qw,
                                ctypes.byref(bad))
    if done == -2:
        raise NonFiniteRow(bad.value)
    if done != out.size:
        raise MxError(f"native quantizer wrote {done} bytes for GGML type {type_id}, expected {out.size}")


_CASTS = {("bf16", "f16"): "mx_bf16_to_f16", ("f32", "f16"): "mx_f32_to_f16", ("bf16", "f32"): "mx_bf16_to_f32"}


# Casts the C code may run with the output over its own input (element i is written after it is read, and never
# past it): narrowing to f16.
IN_PLACE_CASTS = {(torch.bfloat16, torch.float16), (torch.float32, torch.float16)}


def cast_tensor(t: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`t.to(dtype).contiguous()`; for a CPU tensor, bf16 -> f16, f32 -> f16 and bf16 -> f32 run in C (F16C
    when the CPU has it: several GB/s on one thread, where torch's bf16 -> f16 makes about 1 GB/s on two).
    Same values as torch's cast: round to nearest even, subnormals kept. `out` (contiguous, t's shape and
    `dtype`) receives the result when given; a same-dtype cast returns t itself (made contiguous)."""
    names = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}
    fn = _CASTS.get((names.get(t.dtype), names.get(dtype)))
    if t.dtype == dtype:
        return t.contiguous()
    if out is None:
        out = torch.empty(t.shape, dtype=dtype)
    if fn is None or t.device.type != "cpu":
        return out.copy_(t)
    src = t.contiguous()
    getattr(LIB, fn)(src.data_ptr(), out.data_ptr(), src.numel())
    return out
