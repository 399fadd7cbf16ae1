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
