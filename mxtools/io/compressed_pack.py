"""compressed-tensors' weight encodings (what llm-compressor saves for vLLM), decoded to float32 [out, in]
(docs/FORMATS.md, section 9).

pack-quantized (int4, int8): `weight_packed` int32 [out, ceil(in * b / 32)] holds each row's codes densely,
element j at bit j * b of the row's bit string (for b = 4 or 8: 32 / b elements per word, the first in the
lowest bits), each stored as the signed value plus 2^(b-1). `weight_shape` holds [out, in]. Asymmetric
group or channel zero points are packed the same way along the output dimension: `weight_zero_point` int32
[ceil(out * b / 32), n_groups]. `weight_scale` [out, n_groups] (group), [out, 1] (channel) or one value
(tensor). `weight_g_idx` int32 [in], where present, gives each input column's group (else column // group).
    W[o, i] = (q[o, i] - zero[o, g(i)]) * scale[o, g(i)]
float-quantized (FP8 e4m3): `weight` float8_e4m3fn [out, in], `weight_scale` one value (tensor) or [out, 1]
(channel):  W[o, i] = w[o, i] * scale[o].

compressed-tensors computes in the scale's dtype; here the products are exact in float32 (a code of at most 9
bits, or an e4m3 value, times a 16-bit float), so its result is this one rounded to the scale's dtype.
"""
from __future__ import annotations

import math

import torch

from ..core.errors import ShapeError

PACK_BITS = (4, 8)  # the widths whose codes fall whole into int32 words (compressed-tensors also packs 1..8)


def packed_cols(n: int, bits: int) -> int:
    """int32 words holding n codes of `bits` bits."""
    return math.ceil(n * bits / 32)


def unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [rows, k] -> the signed codes int32 [rows, n] (stored value - 2^(bits-1)), element j of a row at
    bit j * bits of its words, lowest first."""
    if bits not in PACK_BITS:
        raise ShapeError(f"{bits}-bit codes are not supported (4 or 8)")
    per = 32 // bits
    rows, k = words.shape
    if k != packed_cols(n, bits):
        raise ShapeError(f"{k} int32 words per row cannot hold {n} codes of {bits} bits")
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = words.to(torch.int64) & 0xFFFFFFFF
    codes = ((u[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(rows, k * per)[:, :n]
    return (codes - (1 << (bits - 1))).to(torch.int32)


def column_groups(n_in: int, n_groups: int, group_size: int | None, g_idx: torch.Tensor | None) -> torch.Tensor:
    """The group of each input column: g_idx as stored, else column // group_size (0 for one group)."""
    if g_idx is not None:
        gi = g_idx.to(torch.int64)
        if gi.shape != (n_in,) or (gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= n_groups)):
            raise ShapeError(f"weight_g_idx must hold {n_in} groups in 0..{n_groups - 1}")
        return gi
    if n_groups == 1:
        return torch.zeros(n_in, dtype=torch.int64)
    return torch.arange(n_in, dtype=torch.int64) // group_size


def int_weight(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], bits: int,
               group_size: int | None = None, zero_point: torch.Tensor | None = None,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight [out, in] of a pack-quantized Linear. `scale` [out, G] (G = 1 for channel), or one
    value (tensor); `zero_point` None (symmetric), packed int32 [ceil(out * bits / 32), G], or one integer value
    (tensor strategy, stored unpacked)."""
    out_f, in_f = shape
    q = unpack_codes(packed, bits, in_f)
    if q.shape[0] != out_f:
        raise ShapeError(f"weight_packed has {q.shape[0]} rows, weight_shape says {out_f}")
    s = scale.float().reshape(1, 1) if scale.numel() == 1 else scale.float()
    if s.shape[0] not in (1, out_f):
        raise ShapeError(f"weight_scale {list(scale.shape)} does not fit {out_f} rows")
    gi = column_groups(in_f, s.shape[1], group_size, g_idx)
    w = q.float()
    if zero_point is not None:
        if zero_point.numel() == 1 and s.numel() == 1:
            zero = zero_point.float().reshape(1, 1)
        else:
            zero = unpack_codes(zero_point.T.contiguous(), bits, out_f).T.float()
            if zero.shape != s.shape:
                raise ShapeError(f"weight_zero_point holds {list(zero.shape)} zeros for scales {list(s.shape)}")
        w -= zero[:, gi] if zero.shape[1] > 1 else zero
    return (w * (s[:, gi] if s.shape[1] > 1 else s)).contiguous()


def fp8_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] of a float-quantized (FP8) Linear: one scale, or one per row [out, 1]."""
    if scale.numel() == 1:
        return weight.float() * scale.float().reshape(())
    if tuple(scale.shape) not in ((weight.shape[0], 1), (weight.shape[0],)):
        raise ShapeError(f"weight_scale {list(scale.shape)} is neither one value nor one per row of "
                         f"{weight.shape[0]}")
    return (weight.float() * scale.float().reshape(-1, 1)).contiguous()
