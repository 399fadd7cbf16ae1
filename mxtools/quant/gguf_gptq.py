"""GPTQ onto llama.cpp's own block grids: error feedback for the GGUF block types (Q8_0, Q4_0..Q5_1, Q2_K..Q6_K).

A ggml block runs along a row's input dimension, the direction GPTQ walks, so each block is a GPTQ group with
llama.cpp's parameters. When the column loop reaches a block (32 values for the legacy types, a 256-value
super-block for the K-quants), ggml's own search (mxtools/native `mx_quantize_grid`, the same C as the encoders)
chooses its scales on the error-updated columns, weighted by the Hessian diagonal (the role the importance matrix
plays in llama.cpp), and quantizes the sub-block scales as ggml does. Each column is then rounded by ggml's own
final rounding step on that fixed grid, its error spread over the later columns through the inverse Hessian, and
its levels are packed into the bytes the encoder wrote for the block.

With the feedback off and the importance matrix as weights, every level is the one ggml's final step picks, so
the bytes equal llama-quantize's (tests/test_gguf_gptq.py): error feedback is then the only difference.

The token embedding table is a lookup with no inputs, but its rows run along the hidden dimension, the direction
ggml's blocks run, so it gets GPTQ too, with a hidden x hidden "Hessian" that says how an error in the embedding
output reaches the model (`embedding_hessian`): the embedding is small against the residual stream after the
first layer (rms 0.02 against 8 on the bundled model), so its error acts through the first layer's RMSNorms (which
drop the error's component along the row itself and scale the rest by the gains and 1/rms) and what follows them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from .. import native
from ..core.errors import ShapeError
from ..io.ggml_blocks import SUPPORTED
from ..io.gguf_format import tensor_nbytes
from ..model import forward
from .gguf_iq import IQ_TYPES, iq_loop
from .gptq import BLOCK_SIZE, GPTQError, Hessian, inverse_cholesky
from .gptq_refine import one_cpu_thread

# The token embedding's GPTQ damping (a fraction of mean(diag(H)), as `damp`), higher than the Linears': on the
# bundled model's q3_k_m 0.05 gave 0.47x the imatrix file's mean KLD, 0.3 gave 0.40x (docs/BENCHMARKS.md).
EMBED_DAMP = 0.3
HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0)))  # Q8_0: trunc(v + copysign(this, v)) is roundf(v)


# ---------------------------------------------------------------- block layouts: levels <-> bytes

def _f16(y: np.ndarray, at: int) -> np.ndarray:
    return y[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _nibbles(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return b & 0x0F, b >> 4


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K: byte l of each 128-value half holds values l, l+32, l+64, l+96 -> [rows, 256]."""
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    v = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | v[:, :, 1] << 2 | v[:, :, 2] << 4 | v[:, :, 3] << 6).reshape(-1, 64)


def _bits(h: np.ndarray, n: int) -> np.ndarray:
    """Bit k of h[:, l] for k < n -> [rows, n, len]."""
    return (h[:, None, :] >> np.arange(n, dtype=np.uint8)[None, :, None]) & 1


def _from_bits(b: np.ndarray) -> np.ndarray:
    """Inverse of _bits: [rows, n, len] of 0/1 -> [rows, len] bytes."""
    return (b.astype(np.uint8) << np.arange(b.shape[1], dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)


def _qs_k4(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles: byte l of each 64-value chunk holds values l and l+32."""
    v = (q.reshape(-1, 4, 2, 32) & 0x0F).astype(np.uint8)
    return (v[:, :, 0] | v[:, :, 1] << 4).reshape(-1, 128)


def _levels_k4(qs: np.ndarray) -> np.ndarray:
    lo, hi = _nibbles(qs.reshape(-1, 4, 32))
    return np.stack([lo, hi], 2).reshape(-1, 256)


def _legacy_qs(q: np.ndarray) -> np.ndarray:
    v = (q & 0x0F).astype(np.uint8)
    return v[:, :16] | v[:, 16:] << 4


def unpack(qtype: Q, y: np.ndarray) -> np.ndarray:
    """The stored levels [rows, block] (uint8; Q8_0 as int8 bits) of one block per row."""
    if qtype == Q.Q8_0:
        return y[:, 2:34].copy()
    if qtype in LEGACY:
        at = 2 + (2 if qtype in (Q.Q4_1, Q.Q5_1) else 0)
        five = qtype in (Q.Q5_0, Q.Q5_1)
        lo, hi = _nibbles(y[:, at + (4 if five else 0):][:, :16])
        q = np.concatenate([lo, hi], 1)
        if five:
            qh = y[:, at:at + 4].copy().view("<u4")[:, 0]
            q |= (((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        return q
    if qtype == Q.Q2_K:
        return _unpack_2bit(y[:, 16:80])
    if qtype == Q.Q3_K:
        return _unpack_2bit(y[:, 32:96]) | (_bits(y[:, :32], 8).reshape(-1, 256) << 2)
    if qtype == Q.Q4_K:
        return _levels_k4(y[:, 16:144])
    if qtype == Q.Q5_K:
        return _levels_k4(y[:, 48:176]) | (_bits(y[:, 16:48], 8).reshape(-1, 256) << 4)
    ql, qh = y[:, :128].reshape(-1, 2, 64), y[:, 128:192].reshape(-1, 2, 32)  # Q6_K
    parts = [ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4]
    return np.stack([p | (((qh >> (2 * k)) & 3) << 4) for k, p in enumerate(parts)], 2).reshape(-1, 256)


def pack(qtype: Q, y: np.ndarray, q: np.ndarray) -> None:
    """Write the levels q [rows, block] (as `unpack` returns them) into the blocks y [rows, bytes] in place."""
    q = q.astype(np.uint8)
    if qtype == Q.Q8_0:
        y[:, 2:34] = q
    elif qtype in LEGACY:
        at = 2 + (2 if qtype in (Q.Q4_1, Q.Q5_1) else 0)
        if qtype in (Q.Q5_0, Q.Q5_1):
            high = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            y[:, at:at + 4] = high.sum(1, dtype=np.uint32).astype("<u4")[:, None].view(np.uint8)
            at += 4
        y[:, at:at + 16] = _legacy_qs(q)
    elif qtype == Q.Q2_K:
        y[:, 16:80] = _pack_2bit(q)
    elif qtype == Q.Q3_K:
        y[:, :32] = _from_bits((q >> 2).reshape(-1, 8, 32) & 1)
        y[:, 32:96] = _pack_2bit(q & 3)
    elif qtype == Q.Q4_K:
        y[:, 16:144] = _qs_k4(q)
    elif qtype == Q.Q5_K:
        y[:, 16:48] = _from_bits((q >> 4).reshape(-1, 8, 32) & 1)
        y[:, 48:176] = _qs_k4(q)
    else:  # Q6_K
        v = q.reshape(-1, 2, 4, 32)
        lo, hi = v & 0x0F, v >> 4
        y[:, :128] = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4],
                                    2).reshape(-1, 128)
        y[:, 128:192] = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(-1, 64)


# ---------------------------------------------------------------- the grid of one block, per row

# Legacy types: (rounding kind, nmax as the C passes it), see mx_quantize_grid in quants.c.
LEGACY = {Q.Q4_0: ("sym", 8), Q.Q5_0: ("sym", 16), Q.Q4_1: ("affine", 15), Q.Q5_1: ("affine", 31),
          Q.Q8_0: ("q8", 127)}
# K-quants: (values per sub-block, lowest level, highest level, affine)
KQUANTS = {Q.Q2_K: (16, 0, 3, True), Q.Q3_K: (16, -4, 3, False), Q.Q4_K: (32, 0, 15, True),
           Q.Q5_K: (32, 0, 31, True), Q.Q6_K: (16, -32, 31, False)}
# The types whose final rounding is per value on a grid (the legacy and K-quant types), and every type GPTQ runs on
# here: those and the i-quants (gguf_iq.py: groups of values snapped onto codebook points, IQ4's scalar levels).
GRID_TYPES = [t for t in SUPPORTED if t in LEGACY or t in KQUANTS]
GPTQ_TYPES = GRID_TYPES + IQ_TYPES


def on_grids(types) -> bool:
    """Whether GPTQ here can quantize every one of these GGML types (the legacy, K-quant and i-quant types)."""
    return set(types) <= set(GPTQ_TYPES)


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for the 8 sub-blocks: (scales, mins) [rows, 8]."""
    s = np.concatenate([sc[:, :4] & 63, (sc[:, 8:12] & 0x0F) | ((sc[:, :4] >> 6) << 4)], 1)
    m = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], 1)
    return s, m


# K-quants: (byte offset of d, of dmin or None, the sub-block scales' range, the mins' range or None)
K_FIELDS = {Q.Q2_K: (80, 82, (0, 15), (0, 15)), Q.Q3_K: (108, None, (-32, 31), None),
            Q.Q4_K: (0, 2, (0, 63), (0, 63)), Q.Q5_K: (0, 2, (0, 63), (0, 63)), Q.Q6_K: (208, None, (-128, 127), None)}


def k_scales(qtype: Q, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The integer sub-block scales and mins (None: no mins) [rows, n_sub] of one K-quant block per row (int32)."""
    if qtype in (Q.Q4_K, Q.Q5_K):
        s, m = _k4_scales(y[:, 4:16])
        return s.astype(np.int32), m.astype(np.int32)
    if qtype == Q.Q2_K:
        sc = y[:, :16].astype(np.int32)
        return sc & 0x0F, sc >> 4
    if qtype == Q.Q3_K:
        sc = y[:, 96:108].astype(np.int32)
        j = np.arange(16)
        low = np.where(j < 8, sc[:, j % 8] & 0x0F, sc[:, j % 8] >> 4)
        high = (sc[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        return (low | high << 4) - 32, None
    return y[:, 192:208].copy().view(np.int8).astype(np.int32), None  # Q6_K


def set_k_scales(qtype: Q, y: np.ndarray, s: np.ndarray, m: np.ndarray | None) -> None:
    """Write sub-block scales and mins (k_scales' form, inside K_FIELDS' ranges) into the blocks y, in place."""
    if qtype in (Q.Q4_K, Q.Q5_K):
        s, m = s.astype(np.uint8), m.astype(np.uint8)
        y[:, 4:8] = (s[:, :4] & 63) | ((s[:, 4:] >> 4) << 6)
        y[:, 8:12] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
        y[:, 12:16] = (s[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    elif qtype == Q.Q2_K:
        y[:, :16] = (s | m << 4).astype(np.uint8)
    elif qtype == Q.Q3_K:
        v = (s + 32).astype(np.uint8)
        y[:, 96:104] = (v[:, :8] & 0x0F) | ((v[:, 8:] & 0x0F) << 4)
        high = (v >> 4) & 3  # sub-block j's top bits go to byte 8 + j % 4 at bit 2 * (j // 4)
        y[:, 104:108] = sum(high[:, 4 * g:4 * g + 4] << (2 * g) for g in range(4)).astype(np.uint8)
    else:  # Q6_K
        y[:, 192:208] = s.astype(np.int8).view(np.uint8)


def _k_grid(qtype: Q, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) per row and sub-block [rows, n_sub] as ggml's final step derives them (float32)."""
    d_at, m_at = K_FIELDS[qtype][:2]
    s, m = k_scales(qtype, y)
    step = _f16(y, d_at)[:, None] * s.astype(np.float32)
    return step, (_f16(y, m_at)[:, None] * m.astype(np.float32) if m_at is not None else None)


class BlockGrid:
    """ggml's final rounding and the dequantized values for the columns of one (super-)block, all rows at once.

    Built from the block's encoding: its bytes y [rows, bytes] and, for the legacy types, the rounding parameters
    par [rows, 3] that mx_quantize_grid reports. `levels(k, x)` gives the stored levels of column k for values x
    [rows]; `values(k, q)` what llama.cpp dequantizes them to."""

    def __init__(self, qtype: Q, y: np.ndarray, par: np.ndarray | None, weighted: bool, device):
        self.qtype, self.weighted = qtype, weighted
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
        self.enc = t(unpack(qtype, y).view(np.int8) if qtype == Q.Q8_0 else unpack(qtype, y))
        if qtype in KQUANTS:
            self.sub, self.lo, self.hi, affine = KQUANTS[qtype]
            step, off = _k_grid(qtype, y)
            self.step, self.off = t(step), t(off) if affine else None
            return
        self.kind, self.nmax = LEGACY[qtype]
        self.sub = 32
        self.a, self.b, self.live = t(par[:, 0:1]), t(par[:, 1:2]), t(par[:, 2:3])
        self.d = t(_f16(y, 0)[:, None])
        self.m = t(_f16(y, 2)[:, None]) if self.kind == "affine" else None

    def levels(self, k: int, x: torch.Tensor) -> torch.Tensor:
        j = k // self.sub
        if self.qtype in KQUANTS:
            step = self.step[:, j]
            v = x if self.off is None else x + self.off[:, j]
            q = torch.round(v / step).clamp_(self.lo, self.hi) - self.lo
            return torch.where(step != 0, q, self.enc[:, k])  # a zero step keeps the search's level (as ggml)
        a, b = self.a[:, 0], self.b[:, 0]
        if self.kind == "q8":
            v = x * a
            return torch.trunc(v + torch.copysign(torch.tensor(HALF_DOWN, device=x.device), v)).clamp_(-128, 127)
        n = self.nmax
        if not self.weighted:
            if self.kind == "sym":
                return torch.trunc(x * a + (n + 0.5)).clamp_(0, 2 * n - 1)
            return torch.trunc((x - b) * a + 0.5).clamp_(0, n)
        live = self.live[:, 0] != 0
        if self.kind == "sym":
            q = torch.round(a * x).clamp_(-n, n - 1) + n
        else:
            q = torch.round(a * (x - b)).clamp_(0, n)
        return torch.where(live, q, torch.zeros_like(q))

    def values(self, k: int, q: torch.Tensor) -> torch.Tensor:
        j = k // self.sub
        if self.qtype in KQUANTS:
            v = self.step[:, j] * (q + self.lo)
            return v if self.off is None else v - self.off[:, j]
        d = self.d[:, 0]
        if self.kind == "q8":
            return d * q
        if self.kind == "sym":
            return d * (q - self.nmax)
        return d * q + self.m[:, 0]

    def stored(self, q: torch.Tensor) -> np.ndarray:
        """Levels [rows, block] (float) as the uint8 array `pack` takes."""
        q = q.to("cpu", torch.int16).numpy()
        return q.astype(np.int8).view(np.uint8) if self.qtype == Q.Q8_0 else q.astype(np.uint8)


def encode_block(qtype: Q, x: np.ndarray, weights: np.ndarray | None, sigma2: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """ggml's encoding of one block per row, x float32 [rows, block]: (bytes [rows, type size], par [rows, 3])."""
    block, size = SUPPORTED[qtype]
    rows = x.shape[0]
    y = np.empty((rows, size), np.uint8)
    par = np.zeros((rows, 3), np.float32)
    done = native.quantize_grid(int(qtype), x, y, block, weights, sigma2, par)
    if done != y.size:
        raise ShapeError(f"mx_quantize_grid wrote {done} bytes for {qtype.name}, expected {y.size}")
    return y, par


def mean_squares(w: torch.Tensor) -> np.ndarray:
    """Each row's mean square as ggml computes it (the sigma2 of the legacy types' importance weights)."""
    x = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
    out = np.empty(x.shape[0], np.float32)
    native.mean_squares(x, out)
    return out


# ---------------------------------------------------------------- GPTQ on the grids

@dataclass
class GGUFQuant:
    """One matrix quantized to a GGML block type: the bytes a GGUF stores and what llama.cpp dequantizes."""

    qtype: Q
    data: np.ndarray  # uint8 [rows, row bytes]
    weight: torch.Tensor  # float32 [rows, cols]: the dequantized weight
    loss: float | None  # 0.5 * sum of squared scaled errors (GPTQ's), None without a Hessian
    damp: float | None
    method: str  # "gptq" or "rtn"


def quantize_matrix(w: torch.Tensor, qtype: Q, h: torch.Tensor | None = None, weights=None, damp: float = 0.01,
                    feedback: bool = True, snap_weights: str = "importance", repass: bool = False) -> GGUFQuant:
    """Quantize w [rows, cols] to `qtype` column by column on ggml's grids.

    h: the Hessian [cols, cols] of w's inputs; None (or feedback=False) rounds without error feedback.
    weights: the per-column importance (float32 [cols]) for ggml's searches; None with h: the damped Hessian
    diagonal; None without h: llama.cpp's unweighted (`_ref`) searches.
    snap_weights, repass: the i-quants' options (gguf_iq.iq_loop).
    """
    if qtype not in GPTQ_TYPES:
        raise ValueError(f"GGML type {qtype.name} has no block grid here")
    if w.dim() != 2 or w.shape[1] % SUPPORTED[qtype][0]:
        raise ShapeError(f"{qtype.name} needs a 2-D weight whose rows are multiples of {SUPPORTED[qtype][0]}, "
                         f"got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise GPTQError("weight has NaN or infinite values")
    wt = w.detach().to(torch.float32, copy=True).T.contiguous()  # [cols, rows]: a column is a contiguous row
    cols = wt.shape[0]
    hinv, used_damp = None, None
    if h is not None:
        h = h.detach().to(wt.device, torch.float32, copy=True)
        if not bool(torch.isfinite(h).all()):
            raise GPTQError("Hessian has NaN or infinite values")
        diag = torch.diagonal(h)
        if weights is None:
            weights = diag + damp * diag.mean()
        if feedback:
            dead = diag == 0
            h[dead, dead] = 1  # a column without input: no feedback through it
            hinv, used_damp = inverse_cholesky(h, damp)
        del h, diag
    qw = None if weights is None else np.ascontiguousarray(torch.as_tensor(weights).float().cpu().numpy())
    if qw is not None and qw.shape != (cols,):
        raise ShapeError(f"importance weights have shape {qw.shape}, the rows have {cols} values")
    sigma2 = mean_squares(w) if qw is not None and qtype in LEGACY else None
    if qtype in IQ_TYPES:
        data, loss = iq_loop(wt, qtype, hinv, qw, snap_weights, repass)
    else:
        data, loss = _loop(wt, qtype, hinv, qw, sigma2)
    deq = wt.T.contiguous()
    return GGUFQuant(qtype, data, deq, loss, used_damp, "gptq" if hinv is not None else "rtn")


def _loop(wt: torch.Tensor, qtype: Q, hinv, qw, sigma2) -> tuple[np.ndarray, float | None]:
    """The column loop on wt = W^T [cols, rows], in lazy blocks; wt ends up holding the dequantized weight."""
    block = SUPPORTED[qtype][0]
    cols, rows = wt.shape
    data = np.empty((rows, tensor_nbytes((cols,), qtype)), np.uint8)
    loss = torch.zeros((), dtype=torch.float64, device=wt.device)
    step = max(BLOCK_SIZE // block, 1) * block if hinv is not None else cols
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = wt[i1:i2]
        err1 = torch.zeros_like(w1) if hinv is not None else None
        with one_cpu_thread(wt.device):
            for g0 in range(0, i2 - i1, block):
                c0 = i1 + g0
                x = np.ascontiguousarray(w1[g0:g0 + block].T.to("cpu").numpy())
                y, par = encode_block(qtype, x, None if qw is None else qw[c0:c0 + block], sigma2)
                grid = BlockGrid(qtype, y, par, qw is not None, wt.device)
                q = torch.empty(block, rows, device=wt.device)
                for k in range(block):
                    i = g0 + k
                    col = w1[i].clone()
                    q[k] = grid.levels(k, col)
                    w1[i] = grid.values(k, q[k])
                    if hinv is not None:
                        e = (col - w1[i]) / hinv[c0 + k, c0 + k]
                        w1[i + 1:].addr_(hinv[c0 + k, i1 + i + 1:i2], e, alpha=-1)
                        err1[i] = e
                pack(qtype, y, grid.stored(q.T))
                data[:, tensor_nbytes((c0,), qtype):tensor_nbytes((c0 + block,), qtype)] = y
        if hinv is not None:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
            loss += 0.5 * err1.double().square().sum()
    return data, float(loss) if hinv is not None else None


# ---------------------------------------------------------------- the token embedding's Hessian

def embedding_hessian(ckpt, samples: torch.Tensor, table: torch.Tensor, seed: int = 0) -> Hessian:
    """A [hidden, hidden] Hessian for GPTQ of the token embedding table along its rows: E[J^T J] over the
    calibration tokens, J the Jacobian of the first decoder layer's output with respect to its input (the
    embedding output) at each token, from the unquantized model.

    Estimated as Hutchinson does: one seeded standard normal probe u per token at the layer's output, backpropagated
    through the layer (attention mixes positions, so each token's g = sum over later positions of J^T u), and
    E[g g^T] accumulated. Costs one forward and backward pass of layer 0 over the calibration samples, one
    sequence at a time (its activations, not the whole batch's, are held for the backward pass). `table`: the
    unquantized embedding table (float32), on the device to run on."""
    spec, device, dtype = ckpt.spec, table.device, torch.float32
    layer = forward.load_layer(ckpt, 0, device, dtype)
    rope = forward.rope_tables(spec, samples.shape[1], device, dtype)
    gen = torch.Generator().manual_seed(seed)
    hess = Hessian(spec.dim, device)
    for s in range(samples.shape[0]):
        x0 = F.embedding(samples[s:s + 1].to(device), table).requires_grad_()
        with torch.enable_grad():
            out, _ = forward.layer_forward(x0, layer, spec, rope)
            probe = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
            g, = torch.autograd.grad(out, x0, grad_outputs=probe)
        hess.add(g)
    return hess
