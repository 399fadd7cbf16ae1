"""GPTQ onto llama.cpp's i-quants: error feedback for IQ1_S .. IQ4_XS, the group of values a codebook point
covers as GPTQ's unit.

When the column loop reaches a block (256 columns; 32 for IQ4_NL), ggml's own encoder (mxtools/native, the same C
as `convert`, byte for byte llama.cpp's) encodes the block's error-updated columns, weighted by the importance
(the Hessian diagonal or the importance matrix), and so chooses the block's scales. Then group by group in column
order each row's group of error-updated values is snapped to the best codebook point at those scales
(native `mx_iq_snap`: an exhaustive search, weighted; signs as the type stores them, for IQ1 the shift), and the
group's error is spread over the later columns through the inverse Hessian (GPTQ's block form: with the group's
point fixed, each column's error in turn, so the group's later columns see the earlier ones' updates). IQ4_NL and
IQ4_XS have scalar levels: each column gets the nearest of kvalues_iq4nl times its sub-block's scale, exactly as
the K-quants' columns get theirs.

`repass`: after the block's loop, ggml's encoder runs again on the values the columns had when they were
snapped (the error-updated ones), and the block is redone from its start with those scales.

Without the feedback the bytes are the encoder's on the whole rows, so they equal llama-quantize's.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from .. import native
from ..core.errors import MxError
from ..io.ggml_blocks import SUPPORTED
from ..io.gguf_format import tensor_nbytes
from .gguf_iq_layout import IQ4_LEVELS, LAYOUTS
from .gptq import BLOCK_SIZE
from .gptq_refine import one_cpu_thread

IQ_TYPES = [t for t in SUPPORTED if t in LAYOUTS]
SNAP_WEIGHTS = ("importance", "gptq")  # the snap's per-column weights: the search's importance, or 1 / U_kk^2
# quantize_matrix's i-quant options as `quantize --to gguf` uses them, and the asymmetric objective's share it uses
# for a mix with i-quant types unless --gptaq is given. Chosen by measurement on the bundled model (32 chunks of
# eval.txt, mean KLD over the imatrix file's; docs/BENCHMARKS.md): the second pass 0.54x against 0.60x (iq2_xs),
# 0.42x against 0.50x (iq3_xxs), 0.45x against 0.51x (iq4_xs); --gptaq 1 0.20x, 0.34x, 0.42x; the snap weighted by
# 1 / U_kk^2 instead of the importance 0.61x, 0.45x, 0.51x.
IQ_OPTIONS: dict = {t: {"repass": True} for t in IQ_TYPES}
IQ_GPTAQ = 1.0


def encode_rows(qtype: Q, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """ggml's encoding of rows x (float32 [rows, n]) with importance qw [n] (or None)."""
    y = np.empty((x.shape[0], tensor_nbytes((x.shape[1],), qtype)), np.uint8)
    native.quantize_rows(int(qtype), np.ascontiguousarray(x, np.float32), "f32", y, qw)
    return y


def decode_rows(qtype: Q, y: np.ndarray, cols: int) -> np.ndarray:
    """What llama.cpp dequantizes the rows y to (gguf-py's decoder)."""
    return gguf_quants.dequantize(y, qtype).reshape(y.shape[0], cols).astype(np.float32)


class BlockSnap:
    """One block of all rows: its bytes from ggml's encoder, then each group snapped onto the codebook at the
    scales the encoder chose. `snap(g, x, w)` takes group g's values x (float32 [rows, group]) and weights w
    [group], writes its point into the bytes and returns the decoded values."""

    def __init__(self, qtype: Q, x: np.ndarray, qw: np.ndarray | None):
        self.layout = LAYOUTS[qtype]
        self.y = encode_rows(qtype, x, qw)
        self.scale = np.ascontiguousarray(self.layout.scales(self.y), np.float32)
        self.shift = self.layout.shifts(self.y)

    def snap(self, g: int, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        lay, scale = self.layout, np.ascontiguousarray(self.scale[:, g])
        if lay.group == 1:
            return self._level(g, x[:, 0], scale)[:, None]
        given = None
        if lay.qtype == Q.IQ3_XXS:
            given = lay.first_parity(self.y, g) if g % 2 else np.full(len(scale), -1, np.int32)
        elif self.shift is not None:
            given = np.ascontiguousarray(self.shift[:, g])
        index, bits, out = native.iq_snap(int(lay.qtype), np.ascontiguousarray(x, np.float32),
                                          np.ascontiguousarray(w, np.float32), scale, given)
        self._write(g, index, bits, scale)
        return out

    def _level(self, g: int, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """IQ4: the nearest level of kvalues_iq4nl times the scale (the first of equals)."""
        values = scale[:, None] * IQ4_LEVELS[None, :]
        index = np.abs(x[:, None] - values).argmin(1).astype(np.int32)
        self._write(g, index, np.zeros_like(index), scale)
        return np.take_along_axis(values, index[:, None], 1)[:, 0]

    def _write(self, g: int, index: np.ndarray, bits: np.ndarray, scale: np.ndarray) -> None:
        """Store group g's point, except in rows whose scale is 0 (all points decode to 0 there: the encoder's
        bytes stay)."""
        live = scale != 0
        if live.all():
            self.layout.write(self.y, g, index, bits)
        elif live.any():
            keep = self.y[~live].copy()
            self.layout.write(self.y, g, index, bits)
            self.y[~live] = keep


def iq_loop(wt: torch.Tensor, qtype: Q, hinv: torch.Tensor | None, qw: np.ndarray | None,
            snap_weights: str = "importance", repass: bool = False) -> tuple[np.ndarray, float | None]:
    """GPTQ's column loop on wt = W^T [cols, rows] for an i-quant type; wt ends up holding the dequantized weight.
    Without hinv: the encoder's bytes of the whole rows. Returns (bytes [rows, row bytes], loss or None)."""
    cols, rows = wt.shape
    if hinv is None:
        y = encode_rows(qtype, wt.T.cpu().numpy(), qw)
        wt.copy_(torch.from_numpy(decode_rows(qtype, y, cols)).T)
        return y, None
    if snap_weights not in SNAP_WEIGHTS:
        raise MxError(f"snap weights {snap_weights!r}: one of {', '.join(SNAP_WEIGHTS)}")
    block = SUPPORTED[qtype][0]
    sw = qw if snap_weights == "importance" else (1 / torch.diagonal(hinv).double() ** 2).float().cpu().numpy()
    data = np.empty((rows, tensor_nbytes((cols,), qtype)), np.uint8)
    loss = torch.zeros((), dtype=torch.float64, device=wt.device)
    step = max(BLOCK_SIZE // block, 1) * block
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1, err1 = wt[i1:i2], torch.zeros_like(wt[i1:i2])
        with one_cpu_thread(wt.device):
            for b0 in range(0, i2 - i1, block):
                saved = (w1[b0:].clone(), err1[b0:].clone()) if repass else None
                y, seen = _block(w1, err1, hinv, i1, b0, block, qtype, qw, sw, None)
                if repass:
                    w1[b0:], err1[b0:] = saved
                    y, _ = _block(w1, err1, hinv, i1, b0, block, qtype, qw, sw, seen)
                c0 = i1 + b0
                data[:, tensor_nbytes((c0,), qtype):tensor_nbytes((c0 + block,), qtype)] = y
        wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
        loss += 0.5 * err1.double().square().sum()
    return data, float(loss)


def _block(w1, err1, hinv, i1: int, b0: int, block: int, qtype: Q, qw, sw, encode_on) -> tuple[np.ndarray, np.ndarray]:
    """One block of the lazy batch w1 (columns i1.. of the matrix) from its column b0: encode (on `encode_on`, the
    columns' values [block, rows], or on w1's current ones), then snap group by group with the feedback. Returns
    the block's bytes and the values each column had when it was snapped [block, rows]."""
    c0, i2 = i1 + b0, i1 + w1.shape[0]
    x = (w1[b0:b0 + block] if encode_on is None else torch.from_numpy(encode_on)).T.cpu().numpy()
    bs = BlockSnap(qtype, x, None if qw is None else np.ascontiguousarray(qw[c0:c0 + block]))
    seen = np.empty((block, w1.shape[1]), np.float32)
    group = bs.layout.group
    for g in range(block // group):
        k0 = b0 + g * group
        vals = w1[k0:k0 + group].T.cpu().numpy()
        out = torch.from_numpy(bs.snap(g, vals, sw[c0 + g * group:c0 + (g + 1) * group]).T.copy()).to(w1.device)
        for k in range(group):
            i = k0 + k
            col = w1[i].clone()
            seen[i - b0] = col.cpu().numpy()
            w1[i] = out[k]
            e = (col - w1[i]) / hinv[i1 + i, i1 + i]
            w1[i + 1:].addr_(hinv[i1 + i, i1 + i + 1:i2], e, alpha=-1)
            err1[i] = e
    return bs.y, seen
