"""Block-output reconstruction on top of GPTQ: after GPTQ has chosen the codes and scales of a decoder layer, the
rounding is tuned so that the quantized layer (attention and the whole MoE block, through the router) reproduces
the float layer's output on the calibration tokens.

Each quantized Linear gets one rounding offset V per weight, in [-0.5, 0.5], tuned by signed gradient descent
(as AutoRound does, Cheng et al. 2023) with a straight-through round:
    Q = s * clamp(round(B + V), -z, maxq - z)
with s, z the Linear's group scale and zero and B the starting point in grid units. AutoRound starts from the
float weight (B = W / s: round-to-nearest at V = 0); here B starts from GPTQ's solution: GPTQ's code less the
zero, moved towards the float weight by half of their difference clamped to half a step, so round(B) is GPTQ's
code and the float weight breaks ties: a code moves to a neighbour once V has moved 0.25 to 0.75 towards it.
The group scales can be tuned as well (`scales`: a factor exp(a) per group and output row, signed descent on a,
kept in [1/2, 2]); codes stay on the same grid, g_idx is unchanged, scales are rounded to fp16 at the end.

The objective is the mean squared difference of the layer outputs, the float layer's computed on the same inputs
(the quantized stream's hidden states, as AutoRound's default). Steps take `batch` calibration sequences; the
step size falls linearly from `lr` (default 1 / iters, AutoRound's) to 0. `holdout` sequences (spread evenly over
the samples) are never trained on: the tuned rounding is kept only when it lowers their error below GPTQ's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..core.names import weight_name
from ..model import forward
from .gptq import QuantResult
from .gptq_grid import fp16_round

ATTENTION = (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o"))
EXPERT = (("ffn_gate", 0), ("ffn_down", 1), ("ffn_up", 2))  # forward.LayerWeights.experts[e] = (w1, w2, w3)
FLOAT_PULL = 0.5  # the share of the float weight's offset from GPTQ's code (clamped to half a step) in B
SCALE_RANGE = math.log(2.0)  # tuned scales stay within [1/2, 2] of GPTQ's


@dataclass(frozen=True)
class TuneConfig:
    """Block-output reconstruction settings: iterations per layer (0: off), step size (None: 1 / iters),
    sequences per step, the positions of each sequence used (its first `window`: with causal attention their
    outputs are exactly those of the whole sequence; 512 is verify's chunk), whether the group scales are tuned
    too, sequences held out to judge the result, seed, and the float weight's pull on the start (FLOAT_PULL)."""

    iters: int = 0
    lr: float | None = None
    batch: int = 8
    window: int = 512
    scales: bool = False
    holdout: int = 8
    seed: int = 0
    pull: float = FLOAT_PULL

    @property
    def on(self) -> bool:
        return self.iters > 0


class _Rounding:
    """One Linear's tunable rounding around GPTQ's result (see the module docstring)."""

    def __init__(self, w: torch.Tensor, res: QuantResult, dev, tune_scales: bool, pull: float = FLOAT_PULL):
        self.res, self.gi = res, res.g_idx.long().to(dev)
        self.s = res.scales.to(torch.float16).float().to(dev)  # [n_groups, out], as a loader reads it
        z = res.zeros.float().to(dev)[self.gi].T  # [out, in]
        r = res.q.to(dev).float() - z  # GPTQ's codes less the zero
        self.base = r + pull * (w.float().to(dev) / self.s[self.gi].T - r).clamp(-0.499, 0.499)
        self.low, self.high = -z, res.cfg.maxq - z
        self.v = torch.zeros_like(self.base, requires_grad=True)
        self.a = torch.zeros_like(self.s, requires_grad=True) if tune_scales else None

    def params(self) -> list[torch.Tensor]:
        return [self.v] + ([self.a] if self.a is not None else [])

    def scales(self) -> torch.Tensor:
        return self.s if self.a is None else self.s * torch.exp(self.a)

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight [out, in]; differentiable in V (straight-through round) and the scales."""
        x = self.base + self.v
        r = torch.minimum(torch.maximum(x + (torch.round(x) - x).detach(), self.low), self.high)
        return self.scales()[self.gi].T * r

    def step(self, lr: float) -> None:
        """One signed-gradient step (the gradients already in .grad), kept inside the allowed ranges."""
        with torch.no_grad():
            self.v.sub_(lr * self.v.grad.sign()).clamp_(-0.5, 0.5)
            if self.a is not None:
                self.a.sub_(lr * self.a.grad.sign()).clamp_(-SCALE_RANGE, SCALE_RANGE)
        for p in self.params():
            p.grad = None

    def result(self) -> QuantResult:
        """The tuned result: codes on the same grid, fp16 scales, zeros and g_idx unchanged."""
        with torch.no_grad():
            r = torch.minimum(torch.maximum(torch.round(self.base + self.v), self.low), self.high)
            scales = fp16_round(self.scales()).cpu() if self.a is not None else self.res.scales
            q = (r - self.low).to(torch.uint8).cpu()
        return replace(self.res, q=q, scales=scales.contiguous())


def _roundings(w: forward.LayerWeights, results: dict, i: int, dev, tune_scales: bool, pull: float) -> dict:
    """A rounding per quantized Linear of layer i, keyed by its canonical name."""
    out = {weight_name(key, i): _Rounding(getattr(w, attr), results[weight_name(key, i)], dev, tune_scales, pull)
           for key, attr in ATTENTION}
    for e, mats in enumerate(w.experts):
        for key, j in EXPERT:
            name = weight_name(key, i, e)
            out[name] = _Rounding(mats[j], results[name], dev, tune_scales, pull)
    return out


def _weights(w: forward.LayerWeights, rounds: dict, i: int) -> forward.LayerWeights:
    """The layer with every quantized Linear's current fake-quantized weight (norms and router in float)."""
    def get(key, e=None):
        return rounds[weight_name(key, i, e)].weight()
    experts = [tuple(get(key, e) for key, _ in sorted(EXPERT, key=lambda k: k[1])) for e in range(len(w.experts))]
    return replace(w, q=get("attn_q"), k=get("attn_k"), v=get("attn_v"), o=get("attn_output"), experts=experts)


def layer_outputs(h: torch.Tensor, w: forward.LayerWeights, spec, rope, dev, store) -> torch.Tensor:
    """The layer's output for every sample of h [n, T, D], in groups of forward.SEQS_PER_ATTENTION, on `store`."""
    out = torch.empty_like(h)
    with torch.no_grad():
        for s in range(0, h.shape[0], forward.SEQS_PER_ATTENTION):
            out[s:s + forward.SEQS_PER_ATTENTION] = forward.layer_forward(
                h[s:s + forward.SEQS_PER_ATTENTION].to(dev), w, spec, rope)[0].to(store)
    return out


def _error(h, target, idx, w, spec, rope, dev) -> float:
    """Mean squared output error over the samples idx (no gradient)."""
    with torch.no_grad():
        total = sum(float(F.mse_loss(forward.layer_forward(h[j:j + 1].to(dev), w, spec, rope)[0],
                                     target[j:j + 1].to(dev), reduction="sum")) for j in idx.tolist())
    return total / (len(idx) * h[0].numel())


def _split(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training samples, held-out samples): `holdout` of the n spread evenly, the rest to train on."""
    hold = torch.linspace(0, n - 1, min(holdout, n - 1)).round().long().unique() if n > 1 and holdout else None
    if hold is None:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    return torch.tensor([j for j in range(n) if j not in set(hold.tolist())]), hold


def _descend(w_float, rounds: dict, i: int, h, target, train, spec, rope, cfg: TuneConfig, dev) -> tuple:
    """cfg.iters signed-gradient steps on batches of the training samples, the step size falling linearly to 0;
    (the first batch's error, the last one's)."""
    params = [p for r in rounds.values() for p in r.params()]
    gen = torch.Generator().manual_seed(cfg.seed + i)
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / cfg.iters
    order, pos, errors = torch.randperm(train.numel(), generator=gen), 0, []
    for it in range(cfg.iters):
        if pos + cfg.batch > order.numel():
            order, pos = torch.randperm(train.numel(), generator=gen), 0
        idx = train[order[pos:pos + cfg.batch]]
        pos += cfg.batch
        out = forward.layer_forward(h[idx.to(h.device)].to(dev), _weights(w_float, rounds, i), spec, rope)[0]
        loss = F.mse_loss(out, target[idx.to(target.device)].to(dev))
        errors.append(float(loss.detach()))
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        for r in rounds.values():
            r.step(lr0 * (1 - it / cfg.iters))
    return errors[0], errors[-1]


def tune_layer(w_float: forward.LayerWeights, results: dict, i: int, h: torch.Tensor, spec, rope, cfg: TuneConfig,
               dev, store) -> tuple[dict, dict]:
    """Tune layer i's rounding (results: GPTQ's QuantResults by canonical name) on its inputs h [n, T, D].
    Returns (the results to keep, by name: the tuned ones, or GPTQ's when the held-out error did not fall; the
    report entry)."""
    h = h[:, :cfg.window]
    target = layer_outputs(h, w_float, spec, rope, dev, store)
    train, hold = _split(h.shape[0], cfg.holdout)
    rounds = _roundings(w_float, results, i, dev, cfg.scales, cfg.pull)
    before = _error(h, target, hold, _weights(w_float, rounds, i), spec, rope, dev) if hold.numel() else None
    first, last = _descend(w_float, rounds, i, h, target, train, spec, rope, cfg, dev)
    tuned = {name: r.result() for name, r in rounds.items()}
    changed = sum(int((t.q != results[n].q).sum()) for n, t in tuned.items())
    report = {"iters": cfg.iters, "scales": cfg.scales, "first_batch_error": first, "last_batch_error": last,
              "codes_changed": changed / sum(t.q.numel() for t in tuned.values()), "kept": True}
    if hold.numel():
        after = _error(h, target, hold, dequantized_layer(w_float, tuned, i), spec, rope, dev)
        report.update(holdout_before=before, holdout_after=after, kept=after < before)
    return (tuned if report["kept"] else results), report


def dequantized_layer(w: forward.LayerWeights, results: dict, i: int) -> forward.LayerWeights:
    """The layer with the results' dequantized weights (as a loader computes them)."""
    dev, dtype = w.q.device, w.q.dtype

    def get(key, e=None):
        return results[weight_name(key, i, e)].dequantize().to(dev, dtype)
    experts = [tuple(get(key, e) for key, _ in sorted(EXPERT, key=lambda k: k[1])) for e in range(len(w.experts))]
    return replace(w, q=get("attn_q"), k=get("attn_k"), v=get("attn_v"), o=get("attn_output"), experts=experts)
