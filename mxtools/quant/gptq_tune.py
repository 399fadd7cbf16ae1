"""Block-output reconstruction on top of GPTQ: after GPTQ has chosen the codes and scales of a decoder layer, they
are tuned so that the quantized layer (attention and the whole MoE block, through the router) reproduces the float
layer's output on the calibration tokens. This is AutoRound's objective and its signed gradient descent (Cheng et
al. 2023), started from GPTQ's solution instead of from round-to-nearest.

Two sets of parameters per quantized Linear can be tuned:
- `scales` (on by default): a factor exp(a) per group and output row on GPTQ's scale, kept in [1/2, 2] and
  rounded to fp16 at the end;
- `codes` (off by default): one rounding offset V per weight, in [-0.5, 0.5], with a straight-through round:
      Q = s * clamp(round(B + V), -z, maxq - z)
  s, z the group scale and zero, B the start in grid units. AutoRound's start is the float weight (B = W / s);
  here B is GPTQ's code r (less the zero) moved towards the float weight by `pull` x tanh(W / s - r), so round(B)
  is GPTQ's code and a code is the nearer to flipping the further GPTQ moved it from the float weight. The start's
  distances to the flip points must be spread: signed steps move every offset by the same amount, so offsets that
  start equally far from their flip points (a clamp of W / s - r piles them up at the clamp) flip together, a
  large coordinated set in one step, and the descent diverged that way on the bundled model.
On the bundled model the scales alone lowered the held-out layer error as much as both together
(docs/BENCHMARKS.md). Codes stay on their grid and g_idx is unchanged: the checkpoint format is GPTQ's.

The objective is AutoRound's: the mean squared difference between the quantized layer's outputs on the quantized
stream's hidden states and the float layer's outputs on the float model's own (so a layer also makes up for the
layers before it). Each step takes `batch` calibration sequences; the
step size falls linearly from `lr` to 0. `holdout` sequences (spread evenly over the samples) are never trained
on: every `check` steps their error is measured, and the checkpoint with the lowest one is kept (GPTQ's own
result when none beats it).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..core.names import weight_name
from ..model import forward
from .gptq import QuantResult
from .gptq_grid import fp16_round

ATTENTION = (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o"))
EXPERT = (("ffn_gate", 0), ("ffn_down", 1), ("ffn_up", 2))  # forward.LayerWeights.experts[e] = (w1, w2, w3)
FLOAT_PULL = 0.49  # B = r + FLOAT_PULL * tanh(W / s - r): under half a step, so round(B) is GPTQ's code r
SCALE_RANGE = math.log(2.0)  # tuned scales stay within [1/2, 2] of GPTQ's
# Fewer training sequences than this (after the held-out ones): no tuning. With few tokens per weight the tuning
# fits the calibration text (on a synthetic layer, 24 x 64 tokens: training error halved, held-out error up 1-13%).
MIN_TRAIN = 32


@dataclass(frozen=True)
class TuneConfig:
    """Block-output reconstruction settings: iterations per layer (0: off), the first step size (None:
    1 / iters, AutoRound's), sequences per step, the positions of each sequence used (its first `window`: with causal
    attention their outputs are exactly those of the whole sequence; 512 is verify's chunk), whether the group
    scales and the codes are tuned, sequences held out to choose the result, steps between their checks, seed,
    and the float weight's pull on the start (FLOAT_PULL)."""

    iters: int = 0
    lr: float | None = None
    batch: int = 8
    window: int = 512
    scales: bool = True
    codes: bool = False
    holdout: int = 8
    check: int = 25
    seed: int = 0
    pull: float = FLOAT_PULL

    @property
    def on(self) -> bool:
        return self.iters > 0 and (self.scales or self.codes)

    def runs_on(self, samples: int) -> bool:
        """Whether tune_layer tunes (rather than skips) with this many calibration samples."""
        return self.on and _split(samples, self.holdout)[0].numel() >= MIN_TRAIN


def rounded(x: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
    """round(x); `straight_through`: with the gradient of x itself (the tuned integers' straight-through round)."""
    return x + (torch.round(x) - x).detach() if straight_through else torch.round(x)


class _Rounding:
    """One Linear's tunable rounding around GPTQ's result (see the module docstring). Another quantizer's results
    get their own class with the same methods (quant/gguf_tune.BlockRounding: llama.cpp's block scales)."""

    CHANGED = "codes_changed"

    def __init__(self, w: torch.Tensor, res: QuantResult, dev, scales: bool, codes: bool, pull: float = FLOAT_PULL):
        self.res, self.gi = res, res.g_idx.long().to(dev)
        self.s = res.scales.to(torch.float16).float().to(dev)  # [n_groups, out], as a loader reads it
        z = res.zeros.float().to(dev)[self.gi].T  # [out, in]
        self.r = res.q.to(dev).float() - z  # GPTQ's codes less the zero
        self.v = None
        if codes:
            self.base = self.r + pull * torch.tanh(w.float().to(dev) / self.s[self.gi].T - self.r)
            self.low, self.high = -z, res.cfg.maxq - z
            self.v = torch.zeros_like(self.base, requires_grad=True)
        self.a = torch.zeros_like(self.s, requires_grad=True) if scales else None

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.v, self.a) if p is not None]

    def scales(self) -> torch.Tensor:
        return self.s if self.a is None else self.s * torch.exp(self.a)

    def codes(self, straight_through: bool = True) -> torch.Tensor:
        """The codes less the zero [out, in]: GPTQ's, or round(B + V) inside the grid (straight-through in V)."""
        if self.v is None:
            return self.r
        return torch.minimum(torch.maximum(rounded(self.base + self.v, straight_through), self.low), self.high)

    def weight(self, stored: bool = False) -> torch.Tensor:
        """The fake-quantized weight [out, in], differentiable in the tuned parameters; `stored`: exactly what
        result().dequantize() gives (fp16 scales, codes rounded), built on the device without a copy of the codes."""
        if stored:
            return fp16_round(self.scales())[self.gi].T * self.codes(straight_through=False)
        return self.scales()[self.gi].T * self.codes()

    def step(self, lr: float) -> None:
        """One signed-gradient step (the gradients already in .grad), kept inside the allowed ranges."""
        with torch.no_grad():
            if self.v is not None:
                self.v.sub_(lr * self.v.grad.sign()).clamp_(-0.5, 0.5)
            if self.a is not None:
                self.a.sub_(lr * self.a.grad.sign()).clamp_(-SCALE_RANGE, SCALE_RANGE)
        for p in self.params():
            p.grad = None

    def result(self) -> QuantResult:
        """The tuned result: codes on the same grid, fp16 scales, zeros and g_idx unchanged."""
        with torch.no_grad():
            q = (self.codes(straight_through=False) - self.r + self.res.q.to(self.r.device).float())
            scales = fp16_round(self.scales()).cpu() if self.a is not None else self.res.scales
        return replace(self.res, q=q.round().to(torch.uint8).cpu(), scales=scales.contiguous())

    def changed(self, kept: QuantResult) -> tuple[int, int]:
        """(codes that differ from GPTQ's, codes) in the kept result."""
        return int((kept.q != self.res.q).sum()), kept.q.numel()


def gptq_rounding(w: torch.Tensor, res: QuantResult, dev, cfg: TuneConfig) -> _Rounding:
    """The rounding of one GPTQ int result: tune_layer's default `rounding`."""
    return _Rounding(w, res, dev, cfg.scales, cfg.codes, cfg.pull)


def _roundings(w: forward.LayerWeights, results: dict, i: int, dev, cfg: TuneConfig, rounding) -> dict:
    """A rounding per quantized Linear of layer i, keyed by its canonical name."""
    def make(weight, name):
        return rounding(weight, results[name], dev, cfg)
    out = {weight_name(key, i): make(getattr(w, attr), weight_name(key, i)) for key, attr in ATTENTION}
    for e, mats in enumerate(w.experts):
        for key, j in EXPERT:
            out[weight_name(key, i, e)] = make(mats[j], weight_name(key, i, e))
    return out


def _weights(w: forward.LayerWeights, rounds: dict, i: int, stored: bool = False) -> forward.LayerWeights:
    """The layer with every quantized Linear's current fake-quantized weight (norms and router in float)."""
    def get(key, e=None):
        return rounds[weight_name(key, i, e)].weight(stored)
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


def _error(h, target, idx, w_float, rounds: dict, i: int, spec, rope, dev) -> float:
    """Mean squared output error over the samples idx of the layer as it would be stored now (no gradient)."""
    with torch.no_grad():
        w = _weights(w_float, rounds, i, stored=True)
        total = sum(float(F.mse_loss(forward.layer_forward(h[j:j + 1].to(dev), w, spec, rope)[0],
                                     target[j:j + 1].to(dev), reduction="sum")) for j in idx.tolist())
    return total / (len(idx) * h[0].numel())


def _split(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training samples, held-out samples): `holdout` of the n spread evenly, the rest to train on."""
    hold = torch.linspace(0, n - 1, min(holdout, n - 1)).round().long().unique() if n > 1 and holdout else None
    if hold is None:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    return torch.tensor([j for j in range(n) if j not in set(hold.tolist())]), hold


@contextmanager
def _tf32(dev):
    """TF32 matrix products on a CUDA device (AutoRound runs in bf16) for the steps' forward and backward passes,
    the float targets and the next layer's inputs; the held-out checks and the kept results stay float32."""
    if torch.device(dev).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def descend(rounds, n_train: int, cfg: TuneConfig, loss, check=None, seed: int = 0, within=nullcontext) -> dict:
    """cfg.iters signed-gradient steps of every rounding in `rounds` (an iterable of tunable roundings), each on
    `loss`(indices of cfg.batch training samples, drawn in shuffled passes over range(n_train)), its forward and
    backward passes inside `within`(); the step size falls linearly from cfg.lr (None: 1 / cfg.iters) to 0. Every
    cfg.check steps and after the last, `check`() (if given) measures the rounding so far. Returns {"first",
    "last"}: the first and last batches' losses; "best": (check's lowest value, its step, the tuned parameters'
    values then), or None without `check`."""
    rounds = list(rounds)
    params = [p for r in rounds for p in r.params()]
    gen = torch.Generator().manual_seed(seed)
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / cfg.iters
    order, pos, errors, best = torch.randperm(n_train, generator=gen), 0, [], None
    for it in range(cfg.iters):
        if pos + cfg.batch > order.numel():
            order, pos = torch.randperm(n_train, generator=gen), 0
        with within():
            value = loss(order[pos:pos + cfg.batch])
            grads = torch.autograd.grad(value, params)
        pos += cfg.batch
        errors.append(float(value.detach()))
        for p, g in zip(params, grads):
            p.grad = g
        for r in rounds:
            r.step(lr0 * (1 - it / cfg.iters))
        if check is not None and ((it + 1) % cfg.check == 0 or it + 1 == cfg.iters):
            err = check()
            if best is None or err < best[0]:
                best = (err, it + 1, [p.detach().clone() for p in params])
    return {"first": errors[0], "last": errors[-1], "best": best}


def _descend(w_float, rounds: dict, i: int, h, target, train, hold, spec, rope, cfg: TuneConfig, dev) -> dict:
    """`descend` on layer i's output error against `target` over batches of the training samples, checked on the
    held-out samples' error (none without held-out samples)."""
    def loss(picked):
        idx = train[picked]
        out = forward.layer_forward(h[idx.to(h.device)].to(dev), _weights(w_float, rounds, i), spec, rope)[0]
        return F.mse_loss(out, target[idx.to(target.device)].to(dev))

    def check():
        return _error(h, target, hold, w_float, rounds, i, spec, rope, dev)
    return descend(rounds.values(), train.numel(), cfg, loss, check if hold.numel() else None, cfg.seed + i,
                   within=lambda: _tf32(dev))


def tune_layer(w_float: forward.LayerWeights, results: dict, i: int, h: torch.Tensor, ref: torch.Tensor | None,
               spec, rope, cfg: TuneConfig, dev, store, rounding=gptq_rounding
               ) -> tuple[dict, dict, torch.Tensor | None, torch.Tensor | None]:
    """Tune layer i's scales or codes (results: GPTQ's results by canonical name; `rounding`(w, result, dev, cfg)
    makes each one's tunable rounding: gptq_rounding for QuantResults) on its inputs h [n, T, D],
    the quantized stream's, towards the float layer's outputs on ref, the float model's stream (its first
    cfg.window positions; None for the first layer: h's). Returns (the results to keep, by name: the checkpoint
    with the lowest held-out error, GPTQ's when none beat it, the last one without held-out samples; the report
    entry; the next layer's inputs from the kept results, None when they are GPTQ's; the next layer's ref)."""
    train, hold = _split(h.shape[0], cfg.holdout)
    if train.numel() < MIN_TRAIN:
        return results, {"skipped": f"{train.numel()} training samples, fewer than {MIN_TRAIN}"}, None, None
    win = h[:, :cfg.window]
    with _tf32(dev):
        target = layer_outputs(win if ref is None else ref, w_float, spec, rope, dev, store)
    rounds = _roundings(w_float, results, i, dev, cfg, rounding)
    before = _error(win, target, hold, w_float, rounds, i, spec, rope, dev) if hold.numel() else None  # GPTQ's
    run = _descend(w_float, rounds, i, win, target, train, hold, spec, rope, cfg, dev)
    report = {"iters": cfg.iters, "scales": cfg.scales, "codes": cfg.codes, "first_batch_error": run["first"],
              "last_batch_error": run["last"]}
    if run["best"] is None:
        kept, report["kept"] = {name: r.result() for name, r in rounds.items()}, True
    else:
        after, step, values = run["best"]
        report.update(holdout_before=before, holdout_after=after, best_step=step, kept=after < before)
        with torch.no_grad():
            for p, value in zip((p for r in rounds.values() for p in r.params()), values):
                p.copy_(value)
        kept = {name: r.result() for name, r in rounds.items()} if after < before else results
    counts = [r.changed(kept[name]) for name, r in rounds.items()]
    report[next(iter(rounds.values())).CHANGED] = sum(c for c, _ in counts) / max(sum(n for _, n in counts), 1)
    if kept is results:
        return kept, report, None, target
    with torch.no_grad(), _tf32(dev):
        return kept, report, layer_outputs(h, _weights(w_float, rounds, i, stored=True), spec, rope, dev, store), target


def dequantized_layer(w: forward.LayerWeights, results: dict, i: int) -> forward.LayerWeights:
    """The layer with the results' dequantized weights (as a loader computes them)."""
    dev, dtype = w.q.device, w.q.dtype

    def get(key, e=None):
        return results[weight_name(key, i, e)].dequantize().to(dev, dtype)
    experts = [tuple(get(key, e) for key, _ in sorted(EXPERT, key=lambda k: k[1])) for e in range(len(w.experts))]
    return replace(w, q=get("attn_q"), k=get("attn_k"), v=get("attn_v"), o=get("attn_output"), experts=experts)
