"""GPTQ v1 ("gptq" checkpoint_format) tensor packing: what vLLM, exllama and transformers load.

Per Linear: qweight int32 [in*bits/32, out] (32/bits consecutive input rows per int32, lowest bits first),
qzeros int32 [n_groups, out*bits/32] (32/bits consecutive output columns per int32, storing zero - 1),
scales [n_groups, out] (fp16), g_idx int32 [in]. A loader computes
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros_field[g_idx[i], o] + 1)).

Asymmetric zero 0: v1 cannot store it (zero - 1 = -1). Our quantizer never produces it (it keeps zeros >= 1 by
widening that row's step, see gptq._range_params), so `pack` refuses a result with a zero outside
[1, 2^bits - 1] with a ValueError instead of silently writing a wrapped value.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..core.errors import ShapeError

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class Codes(Protocol):
    """What `pack` stores: one Linear's integer codes and group parameters (quant.gptq.QuantResult is one)."""

    q: torch.Tensor  # uint8 [out, in], codes in [0, 2^bits - 1]
    scales: torch.Tensor  # float [n_groups, out]
    zeros: torch.Tensor  # int32 [n_groups, out], the integer zero point (not the stored zero - 1)
    g_idx: torch.Tensor  # int32 [in], group of each input column

    @property
    def bits(self) -> int: ...


def _per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"v1 packing supports 2, 4 or 8 bits, not {bits}")
    return 32 // bits


def _pack_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes x [n, m] (0 <= x < 2^bits) along dim 0 into int32 [n*bits/32, m], lowest bits first."""
    per = _per_word(bits)
    n, m = x.shape
    if n % per:
        raise ShapeError(f"{n} rows cannot be packed {per} per int32 at {bits} bits")
    shifts = (torch.arange(per, device=x.device, dtype=torch.int64) * bits)[None, :, None]
    words = (x.to(torch.int64).reshape(n // per, per, m) << shifts).sum(1)  # fields do not overlap: sum == or
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_rows`: int32 [k, m] -> int64 codes [k*32/bits, m]."""
    per = _per_word(bits)
    k, m = words.shape
    shifts = (torch.arange(per, device=words.device, dtype=torch.int64) * bits)[None, :, None]
    u = words.to(torch.int64) & 0xFFFFFFFF
    return ((u[:, None, :] >> shifts) & (2 ** bits - 1)).reshape(k * per, m)


def pack(result: Codes, out_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The four v1 tensors, keyed by suffix ("qweight", "qzeros", "scales", "g_idx"), on the result's device.

    Scales are stored as `out_dtype`; only fp16 (the default) reproduces `result.dequantize()` exactly.
    """
    bits, maxq = result.bits, 2 ** result.bits - 1
    out, _ = result.q.shape
    if int(result.zeros.min()) < 1 or int(result.zeros.max()) > maxq:
        raise ValueError(f"zero points must lie in [1, {maxq}] for the v1 format (it stores zero - 1); "
                         "an asymmetric zero of 0 cannot be saved")
    if out % _per_word(bits):
        raise ShapeError(f"out_features={out} is not a multiple of {_per_word(bits)}, required for qzeros")
    return {
        "qweight": _pack_rows(result.q.T, bits),
        "qzeros": _pack_rows((result.zeros.to(torch.int64) - 1).T, bits).T.contiguous(),
        "scales": result.scales.to(out_dtype).contiguous(),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }


def unpack(tensors: dict[str, torch.Tensor], bits: int, zero_offset: int = 1):
    """(q uint8 [out, in], zeros int32 [n_groups, out] (the real zero: stored + `zero_offset`, 1 in v1 and 0 in
    GPTQModel's v2 "gptq_v2" format), scales as stored, g_idx)."""
    missing = [s for s in SUFFIXES if s not in tensors]
    if missing:
        raise ShapeError(f"GPTQ tensors missing: {', '.join(missing)}")
    q = _unpack_rows(tensors["qweight"], bits).T.to(torch.uint8)
    zeros = (_unpack_rows(tensors["qzeros"].T, bits).T + zero_offset).to(torch.int32)
    scales, g_idx = tensors["scales"], tensors["g_idx"].to(torch.int32)
    if q.shape[1] != g_idx.shape[0] or zeros.shape != scales.shape or scales.shape[1] != q.shape[0]:
        raise ShapeError(f"inconsistent GPTQ shapes: qweight {tuple(tensors['qweight'].shape)}, "
                         f"qzeros {tuple(tensors['qzeros'].shape)}, scales {tuple(scales.shape)}, "
                         f"g_idx {tuple(g_idx.shape)} at {bits} bits")
    return q.contiguous(), zeros.contiguous(), scales, g_idx


def dequantize(tensors: dict[str, torch.Tensor], bits: int, zero_offset: int = 1) -> torch.Tensor:
    """The float32 weight [out, in] a v1 loader (`zero_offset` 1; a v2 one: 0) computes from the four tensors."""
    q, zeros, scales, g_idx = unpack(tensors, bits, zero_offset)
    gi = g_idx.long()
    return (scales.float()[gi] * (q.T.float() - zeros.float()[gi])).T.contiguous()
