"""Block-output reconstruction for `quantize --to gguf`: the fp16 scales of llama.cpp's blocks, tuned.

Every GGML block type this project writes dequantizes linearly in its fp16 block scales: a value is
    d * A + m * B
with d the block's scale, m its min (Q4_1, Q5_1: added; Q2_K, Q4_K, Q5_K: dmin, subtracted through the sub-block
mins) or absent, and A, B fixed by the block's other bytes (levels, sub-block scales, codebook entries, signs).
gptq_tune's descent (gptq_tune.tune_layer) then tunes a factor exp(a) per block on each of them, exactly as it
tunes the int4 group scales (BlockRounding); A and B are read back from the file's own bytes (the block with
d = 1 and m = 0, then d = 0 and m = 1, dequantized by gguf-py), so what is tuned is what llama.cpp computes. The
K-quants also tune their integer sub-block scales and mins (KRounding; A is then rebuilt from the levels). Every
level and codebook choice stays the one GPTQ on the grid made, only scale bytes change, so the file keeps its
types, sizes and layout.

Where the fields sit (ggml-common.h's block structs): most types start with d; Q2_K ends with d, dmin; Q3_K and
Q6_K end with d; IQ1_M spreads d over the top nibbles of its four 16-bit scale words.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ..io.ggml_blocks import SUPPORTED
from .gguf_gptq import K_FIELDS, KQUANTS, k_scales, set_k_scales, unpack
from .gptq_tune import SCALE_RANGE, rounded

FP16_MAX = 65504.0
IQ1M_SCALES = 48  # IQ1_M: byte offset of the four uint16 words whose top nibbles hold d

# Byte offsets of each type's fp16 fields: (d,) or (d, min); None: IQ1_M's packed d (_read/_write).
# The K-quants' from gguf_gptq.K_FIELDS (d, dmin).
FIELDS: dict[Q, tuple] = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2),
    **{t: tuple(at for at in K_FIELDS[t][:2] if at is not None) for t in K_FIELDS},
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,),
    Q.IQ2_S: (0,), Q.IQ1_S: (0,), Q.IQ1_M: (None,),
}
assert set(FIELDS) == set(SUPPORTED), "every block type written needs its scale fields here"

# The step is on by default for the mixes whose bulk type (the mix's default) stores at most this many bits per
# weight. On the bundled model (docs/BENCHMARKS.md) it lowered the mean KLD of q2_k, q3_k_m, q4_k_m and every
# i-quant mix, and left q5_k_m level (1.02 +- 0.02 of GPTQ's on Wikipedia, 0.98 +- 0.02 on fiction) at 10-20x the
# run's time.
TUNED_MAX_BPW = 5.0


def tuned_by_default(default_type: Q) -> bool:
    """Whether `quantize --to gguf` tunes a mix whose default type is this one unless --tune-iters says."""
    block, size = SUPPORTED[default_type]
    return 8 * size / block <= TUNED_MAX_BPW


def _read(blocks: np.ndarray, at) -> np.ndarray:
    """The fp16 field at byte `at` of every block [n, bytes] as float32 [n]."""
    if at is None:
        words = blocks[:, IQ1M_SCALES:IQ1M_SCALES + 8].copy().view(np.uint16)
        bits = sum((words[:, k] >> np.uint16(12)) << np.uint16(4 * k) for k in range(4)).astype(np.uint16)
        return bits.view(np.float16).astype(np.float32)
    return blocks[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _write(blocks: np.ndarray, at, values: np.ndarray) -> None:
    """Store float32 values [n] as the fp16 field at byte `at` of every block, in place."""
    bits = values.astype(np.float16).view(np.uint16)
    if at is None:
        words = blocks[:, IQ1M_SCALES:IQ1M_SCALES + 8].copy().view(np.uint16)
        for k in range(4):
            words[:, k] = (words[:, k] & np.uint16(0x0FFF)) | (((bits >> np.uint16(4 * k)) & np.uint16(0xF)) << 12)
        blocks[:, IQ1M_SCALES:IQ1M_SCALES + 8] = words.view(np.uint8)
        return
    blocks[:, at:at + 2] = bits[:, None].view(np.uint8)


def field_values(data: np.ndarray, qtype: Q) -> np.ndarray:
    """The fp16 fields' values [n_fields, rows, blocks per row] of the blocks data [rows, row bytes] (float32)."""
    blocks = data.reshape(-1, SUPPORTED[qtype][1])
    return np.stack([_read(blocks, at).reshape(data.shape[0], -1) for at in FIELDS[qtype]])


def block_parts(data: np.ndarray, qtype: Q) -> list[np.ndarray]:
    """Each fp16 field's part [rows, cols]: the matrix dequantized with that field 1 and the others 0."""
    rows = data.shape[0]
    blocks = data.reshape(-1, SUPPORTED[qtype][1])
    fields = FIELDS[qtype]
    parts = []
    for k in range(len(fields)):
        unit = blocks.copy()
        for j, at in enumerate(fields):
            _write(unit, at, np.full(unit.shape[0], float(j == k), np.float32))
        parts.append(quants.dequantize(unit, qtype).reshape(rows, -1))
    return parts


def stored_scale(x: torch.Tensor) -> torch.Tensor:
    """The fp16 value a tuned field is stored as (sign kept; finite)."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()


class BlockRounding:
    """One GGUF-quantized Linear's tunable block scales (the rounding gptq_tune.tune_layer descends on): a factor
    exp(a) per block and fp16 field around GPTQ's values. `res` is a gguf_gptq.GGUFQuant; `wrap` turns the tuned
    GGUFQuant into what the pipeline keeps (gguf_quantize's hook result). Types kept in float have nothing to
    tune (their weight is fixed)."""

    CHANGED = "scales_changed"
    USES_PARTS = True  # the weight is built from block_parts (KRounding builds it from the levels)

    def __init__(self, res, dev, wrap):
        self.res, self.wrap = res, wrap
        self.fixed = None
        if res.qtype not in SUPPORTED:
            self.fixed = torch.from_numpy(quants.dequantize(res.data, res.qtype)).float().to(dev)
            self.f, self.parts, self.a = None, [], []
            return
        self.block = SUPPORTED[res.qtype][0]
        self.f = torch.from_numpy(field_values(res.data, res.qtype)).to(dev)  # [fields, rows, blocks]
        self.parts = [torch.from_numpy(p).float().to(dev) for p in block_parts(res.data, res.qtype)] \
            if self.USES_PARTS else []
        self.a = torch.zeros_like(self.f, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [] if self.fixed is not None else [self.a]

    def scales(self, stored: bool = False) -> torch.Tensor:
        x = self.f * torch.exp(self.a)
        return stored_scale(x) if stored else x

    def weight(self, stored: bool = False) -> torch.Tensor:
        """The dequantized weight [rows, cols], differentiable in the factors; `stored`: with the fp16 fields as
        the file stores them."""
        if self.fixed is not None:
            return self.fixed
        scales = self.scales(stored)
        out = 0
        for k, part in enumerate(self.parts):
            rows, cols = part.shape
            out = out + (part.view(rows, -1, self.block) * scales[k][..., None]).view(rows, cols)
        return out

    def step(self, lr: float) -> None:
        """One signed-gradient step (the gradient already in a.grad), kept within SCALE_RANGE."""
        if self.fixed is not None:
            return
        with torch.no_grad():
            self.a.sub_(lr * self.a.grad.sign()).clamp_(-SCALE_RANGE, SCALE_RANGE)
        self.a.grad = None

    def result(self):
        """The tuned blocks: the same bytes but the fp16 fields."""
        if self.fixed is not None:
            return self.wrap(self.res)
        nbytes = SUPPORTED[self.res.qtype][1]
        data = self.res.data.copy()
        blocks = data.reshape(-1, nbytes)
        with torch.no_grad():
            values = self.scales(stored=True).cpu().numpy()
        for at, v in zip(FIELDS[self.res.qtype], values):
            _write(blocks, at, v.reshape(-1))
        return self.wrap(replace(self.res, data=data, weight=None))

    def changed(self, kept) -> tuple[int, int]:
        """(fields whose stored value differs from GPTQ's, fields) in the kept result."""
        if self.fixed is not None:
            return 0, 0
        n = self.f.shape[1] * self.f.shape[2]
        after = field_values(kept.res.data, kept.res.qtype)
        return int((after != self.f.cpu().numpy()).sum()), n * self.f.shape[0]


class KRounding(BlockRounding):
    """A K-quant Linear's block scales and, besides, its integer sub-block scales and mins: each gets a factor
    exp(b) too, the product rounded to the nearest integer in the type's range (straight through for the
    gradient), so a sub-block of 16 or 32 values can move its own scale by a step of its integer scale."""

    USES_PARTS = False

    def __init__(self, res, dev, wrap):
        super().__init__(res, dev, wrap)
        qtype = res.qtype
        sub, lo, _, _ = KQUANTS[qtype]
        nbytes = SUPPORTED[qtype][1]
        rows, blocks = self.f.shape[1:]
        y = res.data.reshape(-1, nbytes)
        levels = unpack(qtype, y).astype(np.float32) + lo
        self.levels = torch.from_numpy(levels).to(dev).view(rows, blocks, -1, sub)
        s, m = k_scales(qtype, y)
        self.ranges = K_FIELDS[qtype][2:]
        self.ints = [torch.from_numpy(v.astype(np.float32)).to(dev).view(rows, blocks, -1)
                     for v in (s, m) if v is not None]
        self.b = [torch.zeros_like(v, requires_grad=True) for v in self.ints]

    def params(self) -> list[torch.Tensor]:
        return [self.a, *self.b]

    def sub_scales(self, stored: bool = False) -> list[torch.Tensor]:
        return [rounded(v * torch.exp(b), straight_through=not stored).clamp(*r)
                for v, b, r in zip(self.ints, self.b, self.ranges)]

    def weight(self, stored: bool = False) -> torch.Tensor:
        scales, ints = self.scales(stored), self.sub_scales(stored)
        w = scales[0][..., None, None] * ints[0][..., None] * self.levels
        if len(ints) > 1:
            w = w - (scales[1][..., None] * ints[1])[..., None]
        return w.reshape(w.shape[0], -1)

    def step(self, lr: float) -> None:
        super().step(lr)
        with torch.no_grad():
            for b in self.b:
                b.sub_(lr * b.grad.sign()).clamp_(-SCALE_RANGE, SCALE_RANGE)
                b.grad = None

    def result(self):
        taken = super().result()
        y = taken.res.data.reshape(-1, SUPPORTED[self.res.qtype][1])
        with torch.no_grad():
            ints = [v.reshape(y.shape[0], -1).cpu().numpy().astype(np.int32) for v in self.sub_scales(stored=True)]
        set_k_scales(self.res.qtype, y, ints[0], ints[1] if len(ints) > 1 else None)
        return taken

    def changed(self, kept) -> tuple[int, int]:
        """(fp16 fields and integer sub-block scales or mins that differ from GPTQ's, all of them)."""
        changed, n = super().changed(kept)
        y = kept.res.data.reshape(-1, SUPPORTED[self.res.qtype][1])
        after = [v for v in k_scales(self.res.qtype, y) if v is not None]
        for a, v in zip(after, self.ints):
            changed += int((a != v.reshape(a.shape).cpu().numpy()).sum())
            n += a.size
        return changed, n


def rounding(res, dev, wrap) -> BlockRounding:
    """The tunable rounding of one GGUF-quantized Linear: KRounding for the K-quants, else BlockRounding."""
    return KRounding(res, dev, wrap) if res.qtype in KQUANTS else BlockRounding(res, dev, wrap)
