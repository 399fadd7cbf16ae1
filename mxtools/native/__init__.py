"""mxtools' native kernels: GGML block quantizers and float casts in C (built by setup.py as mxtools.native._lib).

The shared object is loaded with ctypes, which releases the GIL for the duration of each call, so Python
threads that call these functions on different rows run in parallel.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util

import numpy as np
import torch

from ..core.errors import MxError

_ptr, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

# Every C entry point: name -> (restype, argtypes). The one place the library's signatures are declared.
SIGNATURES = {
    "mx_quantize_rows": (_i64, [_int, _int, _ptr, _ptr, _i64, _i64, _ptr, ctypes.POINTER(_i64)]),
    "mx_quantize_grid": (_i64, [_int, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr]),
    "mx_mean_squares": (None, [_ptr, _i64, _i64, _ptr]),
    "mx_iq_snap": (_i64, [_int, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr]),
    **{name: (None, [_ptr, _ptr, _i64]) for name in ("mx_bf16_to_f16", "mx_f32_to_f16", "mx_bf16_to_f32",
                                                     "mx_f32_to_f16_soft")},
}


@functools.cache
def lib() -> ctypes.CDLL:
    """The shared object, loaded on first use with every signature of SIGNATURES declared."""
    spec = importlib.util.find_spec("mxtools.native._lib")
    if spec is None or spec.origin is None:
        raise MxError("mxtools' native kernels are not built; rebuild them with `pip install -e .` in the "
                      "checkout (or reinstall mxtools)")
    try:
        loaded = ctypes.CDLL(spec.origin)
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(loaded, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as exc:
        raise MxError(f"mxtools' native kernels cannot be loaded ({exc}); rebuild them with `pip install -e .` "
                      "in the checkout (or reinstall mxtools)", file=spec.origin) from None
    return loaded


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
    done = lib().mx_quantize_rows(type_id, SOURCE_TYPES[src], x.ctypes.data, out.ctypes.data, rows, n, qw,
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
    getattr(lib(), fn)(src.data_ptr(), out.data_ptr(), src.numel())
    return out


def quantize_grid(type_id: int, x: np.ndarray, y: np.ndarray, block: int, weights: np.ndarray | None,
                  sigma2: np.ndarray | None, par: np.ndarray) -> int:
    """ggml's encoding of one block per row of x (float32 [rows, block]) into y (uint8 [rows, type size]); each
    row's grid parameters go to par (float32 [rows, 3]). Returns the bytes written."""
    ptr = lambda a: None if a is None else a.ctypes.data
    return lib().mx_quantize_grid(type_id, x.ctypes.data, y.ctypes.data, x.shape[0], block, ptr(weights),
                                  ptr(sigma2), par.ctypes.data)


def mean_squares(x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = the mean square of row r of x (float32 [rows, n], C-contiguous), in ggml's summation order."""
    lib().mx_mean_squares(x.ctypes.data, x.shape[0], x.shape[1], out.ctypes.data)


def iq_snap(type_id: int, x: np.ndarray, weights: np.ndarray, scale: np.ndarray, given: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snap each row of x (float32 [rows, g], C-contiguous; g 8, or 4 for IQ3) onto GGML type `type_id`'s codebook
    at that row's scale (float32 [rows]), weights [g]: (point index, sign bits or IQ1 shift bit, decoded values).
    `given` (int32 [rows]): IQ3_XXS the parity the negatives must have (-1: any), IQ1_S the shift bit."""
    rows = x.shape[0]
    index, bits = np.empty(rows, np.int32), np.empty(rows, np.int32)
    out = np.empty_like(x)
    ptr = lambda a: None if a is None else a.ctypes.data
    g = lib().mx_iq_snap(type_id, x.ctypes.data, rows, weights.ctypes.data, scale.ctypes.data, ptr(given),
                         index.ctypes.data, bits.ctypes.data, out.ctypes.data)
    if g != x.shape[1]:
        raise MxError(f"mx_iq_snap answered {g} for GGML type {type_id} with groups of {x.shape[1]}")
    return index, bits, out
