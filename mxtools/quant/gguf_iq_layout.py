"""Where the i-quants keep a group's scale and its codebook point: reading the scales ggml's encoder chose out of a
block's bytes and writing a group's new point into them (byte layouts of ggml-common.h's block_iq* structs).

A layout works on one block per row, y uint8 [rows, type size], all rows at once. `scales(y)` gives the factor
llama.cpp multiplies each group's codebook point by (float32 [rows, groups], computed as ggml's dequantizer does);
`write(y, g, index, bits)` stores group g's point index and sign bits (IQ1_M: its shift bit). IQ4_NL and IQ4_XS
have scalar levels: their "groups" are single values and the index is the level (0..15 of kvalues_iq4nl).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..io.ggml_blocks import SUPPORTED

IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
IQ1_DELTA = np.float32(0.125)


def _f16(y: np.ndarray, at: int) -> np.ndarray:
    return y[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _u16(y: np.ndarray, at: int) -> np.ndarray:
    return y[:, at:at + 2].copy().view("<u2")[:, 0].astype(np.uint32)


def _u32(y: np.ndarray, at: int) -> np.ndarray:
    return y[:, at:at + 4].copy().view("<u4")[:, 0]


def _put(y: np.ndarray, at: int, v: np.ndarray, dtype: str) -> None:
    y[:, at:at + np.dtype(dtype).itemsize] = v.astype(dtype)[:, None].view(np.uint8)


def _field(y: np.ndarray, at: int, shift: int, width: int, v: np.ndarray, dtype: str = "<u4") -> None:
    """Replace bits shift..shift+width-1 of the little-endian integer at byte `at` by v."""
    size = np.dtype(dtype).itemsize
    word = y[:, at:at + size].copy().view(dtype)[:, 0].astype(np.uint32)
    mask = np.uint32(((1 << width) - 1) << shift)
    _put(y, at, (word & ~mask) | ((v.astype(np.uint32) << np.uint32(shift)) & mask), dtype)


def _nibble(y: np.ndarray, at: int, high: bool) -> np.ndarray:
    return ((y[:, at] >> 4) if high else y[:, at]) & 0x0F


def _iq2_db(d: np.ndarray, ls: np.ndarray) -> np.ndarray:
    return d[:, None] * (np.float32(0.5) + ls.astype(np.float32)) * np.float32(0.25)


class Layout:
    """One i-quant type's block: `group` values per codebook point, `groups` points per block."""

    def __init__(self, qtype: Q, group: int):
        self.qtype, self.group = qtype, group
        self.block = SUPPORTED[qtype][0]
        self.groups = self.block // group

    def scales(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def shifts(self, y: np.ndarray) -> np.ndarray | None:
        """IQ1_S: each group's shift bit (1: -delta), fixed per 32 values by the encoder; None for other types."""
        return None

    def write(self, y: np.ndarray, g: int, index: np.ndarray, bits: np.ndarray) -> None:
        raise NotImplementedError


class IQ2XXS(Layout):
    def __init__(self):
        super().__init__(Q.IQ2_XXS, 8)

    def scales(self, y):
        ls = np.stack([_u32(y, 6 + 8 * ib) >> 28 for ib in range(8)], 1)
        return np.repeat(_iq2_db(_f16(y, 0), ls), 4, 1)

    def write(self, y, g, index, bits):
        ib, k = divmod(g, 4)
        y[:, 2 + 8 * ib + k] = index.astype(np.uint8)
        _field(y, 6 + 8 * ib, 7 * k, 7, bits & 127)


class IQ2XS(Layout):
    def __init__(self):
        super().__init__(Q.IQ2_XS, 8)

    def scales(self, y):
        ls = np.stack([_nibble(y, 66 + ib // 2, ib % 2 == 1) for ib in range(16)], 1)
        return np.repeat(_iq2_db(_f16(y, 0), ls), 2, 1)

    def write(self, y, g, index, bits):
        _put(y, 2 + 2 * g, index | ((bits & 127) << 9), "<u2")


class IQ2S(Layout):
    def __init__(self):
        super().__init__(Q.IQ2_S, 8)

    def scales(self, y):
        ls = np.stack([_nibble(y, 74 + ib // 2, ib % 2 == 1) for ib in range(16)], 1)
        return np.repeat(_iq2_db(_f16(y, 0), ls), 2, 1)

    def write(self, y, g, index, bits):
        y[:, 2 + g] = (index & 255).astype(np.uint8)
        _field(y, 66 + g // 4, 2 * (g % 4), 2, index >> 8, "u1")
        y[:, 34 + g] = bits.astype(np.uint8)


class IQ3XXS(Layout):
    """Groups of 4; the 7 sign bits of 8 values span two groups (the second four store three, the eighth bit is
    the parity)."""

    def __init__(self):
        super().__init__(Q.IQ3_XXS, 4)

    def scales(self, y):
        ls = np.stack([_u32(y, 66 + 4 * ib) >> 28 for ib in range(8)], 1).astype(np.float32)
        return np.repeat(_f16(y, 0)[:, None] * (np.float32(0.5) + ls) * np.float32(0.5), 8, 1)

    def first_parity(self, y: np.ndarray, g: int) -> np.ndarray:
        """For the second four of eight (g odd): the parity of the first four's negatives as stored, which the
        second four's must match (int32 [rows])."""
        ib, k = g // 8, (g % 8) // 2
        first = (_u32(y, 66 + 4 * ib) >> np.uint32(7 * k)) & np.uint32(15)
        return (np.unpackbits(first.astype(np.uint8)[:, None], axis=1).sum(1) & 1).astype(np.int32)

    def write(self, y, g, index, bits):
        y[:, 2 + g] = index.astype(np.uint8)
        ib, k, second = g // 8, (g % 8) // 2, g % 2
        if second:
            _field(y, 66 + 4 * ib, 7 * k + 4, 3, bits & 7)
        else:
            _field(y, 66 + 4 * ib, 7 * k, 4, bits & 15)


class IQ3S(Layout):
    def __init__(self):
        super().__init__(Q.IQ3_S, 4)

    def scales(self, y):
        ls = np.stack([_nibble(y, 106 + ib // 2, ib % 2 == 1) for ib in range(8)], 1).astype(np.float32)
        return np.repeat(_f16(y, 0)[:, None] * (1 + 2 * ls), 8, 1)

    def write(self, y, g, index, bits):
        y[:, 2 + g] = (index & 255).astype(np.uint8)
        _field(y, 66 + g // 8, g % 8, 1, index >> 8, "u1")
        _field(y, 74 + g // 2, 4 * (g % 2), 4, bits, "u1")


class IQ1S(Layout):
    def __init__(self):
        super().__init__(Q.IQ1_S, 8)

    def scales(self, y):
        ls = np.stack([(_u16(y, 34 + 2 * ib) >> 12) & 7 for ib in range(8)], 1).astype(np.float32)
        return np.repeat(_f16(y, 0)[:, None] * (2 * ls + 1), 4, 1)

    def shifts(self, y):
        return np.repeat(np.stack([_u16(y, 34 + 2 * ib) >> 15 for ib in range(8)], 1).astype(np.int32), 4, 1)

    def write(self, y, g, index, bits):
        y[:, 2 + g] = (index & 255).astype(np.uint8)
        _field(y, 34 + 2 * (g // 4), 3 * (g % 4), 3, index >> 8, "<u2")


class IQ1M(Layout):
    def __init__(self):
        super().__init__(Q.IQ1_M, 8)

    def scales(self, y):
        w = [_u16(y, 48 + 2 * k) for k in range(4)]
        d = ((w[0] >> 12) | ((w[1] >> 8) & 0xF0) | ((w[2] >> 4) & 0xF00) | (w[3] & 0xF000)).astype(np.uint16)
        d = d.view(np.float16).astype(np.float32)
        ls = np.stack([(w[sb // 4] >> (3 * (sb % 4))) & 7 for sb in range(16)], 1).astype(np.float32)
        return np.repeat(d[:, None] * (2 * ls + 1), 2, 1)

    def write(self, y, g, index, bits):
        y[:, g] = (index & 255).astype(np.uint8)
        _field(y, 32 + g // 2, 4 * (g % 2), 4, (index >> 8) | (bits << 3), "u1")


class IQ4NL(Layout):
    def __init__(self):
        super().__init__(Q.IQ4_NL, 1)

    def scales(self, y):
        return np.repeat(_f16(y, 0)[:, None], 32, 1)

    def write(self, y, g, index, bits):
        _field(y, 2 + g % 16, 4 * (g // 16), 4, index, "u1")


class IQ4XS(Layout):
    def __init__(self):
        super().__init__(Q.IQ4_XS, 1)

    def scales(self, y):
        high = _u16(y, 2)
        ls = np.stack([_nibble(y, 4 + ib // 2, ib % 2 == 1).astype(np.int32) | (((high >> (2 * ib)) & 3) << 4)
                       for ib in range(8)], 1).astype(np.int32)
        return np.repeat(_f16(y, 0)[:, None] * (ls - 32).astype(np.float32), 32, 1)

    def write(self, y, g, index, bits):
        ib, k = divmod(g, 32)
        _field(y, 8 + 16 * ib + k % 16, 4 * (k // 16), 4, index, "u1")


LAYOUTS = {t.qtype: t for t in (IQ2XXS(), IQ2XS(), IQ2S(), IQ3XXS(), IQ3S(), IQ1S(), IQ1M(), IQ4NL(), IQ4XS())}
