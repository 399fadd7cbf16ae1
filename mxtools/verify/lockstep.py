"""A candidate and a reference checkpoint run side by side, one layer at a time, to find where they part.

Per layer two kinds of numbers are collected:
- free-running: the candidate runs on its own hidden states, as it would in use. `rel_error`
  ||h_c - h_r|| / ||h_r|| and `cosine` (mean over tokens) of the hidden state after the layer, and
  `routing_disagreement`, the share of tokens whose top-k expert SET differs from the reference's. These grow
  smoothly through a healthy quantized model, so they show how damage accumulates but locate nothing.
- local: the candidate's layer applied to the REFERENCE's input of that layer. `attn_error` and `moe_error`
  are ||u_c - u_r|| / ||u_r|| for each sublayer's update u (attention output; MoE output), and
  `local_routing_disagreement` the top-k set disagreement on identical router inputs. A healthy artifact's local
  error is about its weights' relative rounding error (~0.5% for q8_0, ~10% for 4-bit) in EVERY layer and
  does not accumulate; a real fault (k projection left in the wrong rotary order, experts swapped or
  mislabelled, a transposed or shifted tensor) replaces that layer's update by something else, which gives a
  local error near 1 or above in that layer and nowhere before it.

Rule: `first_divergent_layer` = the first layer whose attn_error or moe_error exceeds `max_error`, or whose
local routing disagreement exceeds `max_routing` (the router and norms are never quantized, so healthy
artifacts route identical inputs identically up to near-ties). The limits come per outtype from
`report.DEFAULT_THRESHOLDS`, well above the healthy level and well below 1.

Memory: the candidate's layer + the reference's layer + about eight [tokens, D] activations. The candidate runs
each layer twice (local and free-running).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import ShapeError
from ..core.tensors import Checkpoint
from ..model import forward

_SUMS = ("d2", "r2", "cos", "n", "route", "attn_d2", "attn_r2", "moe_d2", "moe_r2", "local_route")


def _sq(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).sum())


def set_differs(a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """Per token: True where the top-k expert sets differ (order within top-k ignored)."""
    return (a_idx.sort(-1).values != b_idx.sort(-1).values).any(-1)


def check_same_shape(candidate: Checkpoint, reference: Checkpoint) -> None:
    """Refuse to compare models of different shapes (any hyperparameter but the name)."""
    a, b = candidate.spec.to_dict(), reference.spec.to_dict()
    diff = [k for k in a if k not in ("name", "context_length") and a[k] != b[k]]
    if diff:
        raise ShapeError("candidate and reference differ in " + ", ".join(f"{k} ({a[k]} vs {b[k]})" for k in diff),
                         file=candidate.path)


@dataclass
class LayerSums:
    """Running sums for the per-layer statistics (so several passes over chunk groups can be pooled)."""

    n_layers: int
    sums: list = field(default_factory=list)
    embed: list = field(default_factory=lambda: [0.0, 0.0])

    def __post_init__(self):
        self.sums = [dict.fromkeys(_SUMS, 0.0) for _ in range(self.n_layers)]

    def add(self, i: int, **values) -> None:
        for k, v in values.items():
            self.sums[i][k] += v

    def layers(self) -> list[dict]:
        """Per-layer statistics dicts."""
        return [_finish(i, s) for i, s in enumerate(self.sums)]

    def embed_error(self) -> float:
        return _ratio(*self.embed)


def _ratio(d2: float, r2: float) -> float:
    return (d2 / r2) ** 0.5 if r2 > 0 else (0.0 if d2 == 0 else float("inf"))


def _finish(i: int, s: dict) -> dict:
    n = max(s["n"], 1)
    return {"layer": i, "rel_error": _ratio(s["d2"], s["r2"]), "cosine": s["cos"] / n,
            "routing_disagreement": s["route"] / n, "attn_error": _ratio(s["attn_d2"], s["attn_r2"]),
            "moe_error": _ratio(s["moe_d2"], s["moe_r2"]), "local_routing_disagreement": s["local_route"] / n}


def _local_step(h_r, w_c, w_r, spec, rope, sums: LayerSums, i: int) -> torch.Tensor:
    """Reference layer, plus the candidate's sublayers on the reference's inputs; returns (new h_r, its ids)."""
    a_r = forward.attn_block(h_r, w_r, spec, rope)
    a_c = forward.attn_block(h_r, w_c, spec, rope)
    sums.add(i, attn_d2=_sq(a_c - a_r), attn_r2=_sq(a_r))
    del a_c
    mid = h_r + a_r
    m_r, idx_r = forward.moe_block(mid, w_r, spec)
    m_c, idx_c = forward.moe_block(mid, w_c, spec)
    sums.add(i, moe_d2=_sq(m_c - m_r), moe_r2=_sq(m_r), local_route=float(set_differs(idx_c, idx_r).sum()))
    return mid + m_r, idx_r


def run(candidate: Checkpoint, reference: Checkpoint, tokens, device="auto", dtype=torch.float32,
        sums: LayerSums | None = None):
    """Advance both models over `tokens` [B, T] (already with BOS); returns (h_c, h_r, sums).

    `sums` accumulates across calls (one call per group of chunks); pass None to start fresh.
    """
    check_same_shape(candidate, reference)
    spec, dev = reference.spec, forward.resolve_device(device)
    sums = sums or LayerSums(spec.n_layers)
    toks = forward.as_tokens(tokens, spec, dev)
    h_c, h_r = forward.embed(candidate, toks, dev, dtype), forward.embed(reference, toks, dev, dtype)
    sums.embed[0] += _sq(h_c - h_r)
    sums.embed[1] += _sq(h_r)
    rope = forward.rope_tables(spec, toks.shape[1], dev, dtype)
    for i in range(spec.n_layers):
        w_r, w_c = forward.load_layer(reference, i, dev, dtype), forward.load_layer(candidate, i, dev, dtype)
        h_c, idx_c = forward.layer_forward(h_c, w_c, spec, rope)
        h_r, idx_r = _local_step(h_r, w_c, w_r, spec, rope, sums, i)
        del w_r, w_c
        sums.add(i, d2=_sq(h_c - h_r), r2=_sq(h_r), cos=_cos_sum(h_c, h_r), n=float(idx_r.shape[0]),
                 route=float(set_differs(idx_c, idx_r).sum()))
    return h_c, h_r, sums


def first_divergent_layer(layers: list[dict], max_error: float, max_routing: float):
    """(first layer breaking the local limits, which sublayer) or (None, None); see the module docstring."""
    for s in layers:
        for key, limit, what in (("attn_error", max_error, "attention"), ("moe_error", max_error, "moe"),
                                 ("local_routing_disagreement", max_routing, "routing")):
            if s[key] > limit:
                return s["layer"], what
    return None, None
