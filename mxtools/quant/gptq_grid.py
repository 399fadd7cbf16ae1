"""The quantization grid of GPTQ int checkpoints: each group's (scale, zero) per output row, and the codes.

Scales are rounded to fp16 before the codes are chosen (the value a loader reads); symmetric mode uses
[-absmax, absmax]; asymmetric zeros stay >= 1 (v1 stores zero - 1). Three ways to choose a group's range:
min/max, the reference's |err|^2.4 shrink search (`mse`), and the search that minimises the rounding error
weighted by GPTQ's column costs (search="hessian"). `cfg` is a gptq.QuantConfig (bits, sym, mse, search, maxq).
"""
from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal: a scale below it would round to 0
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4  # the reference's shrink search settings
# The weighted search's range factors (1 is the min/max range): shrinking clips outliers, growing past 1 lets the
# symmetric grid [-8s, 7s] reach a positive maximum.
SEARCHES = ("minmax", "hessian")  # how a group's range is chosen (the `mse` flag is the reference's search)
SEARCH_RANGE = tuple(round(1.15 - 0.01 * i, 2) for i in range(46) if i != 15)
# Values of x x candidates evaluated at once by the "hessian" search, per device type. A CPU keeps them in its caches
# (4 MB: an 8x7B expert's groups go one candidate at a time; 4.5x slower per search when the candidates went
# together through memory); a GPU takes them together (1 GB temporaries), as its cost is the kernels launched.
SEARCH_ELEMENTS = {"cpu": 2 ** 20, "cuda": 2 ** 28}


def fp16_round(scale: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 value a checkpoint stores, never to 0 or inf (that would divide by zero)."""
    return scale.clamp(FP16_TINY, FP16_MAX).to(torch.float16).float()


def _range_params(xmin, xmax, cfg):
    """(scale, zero) per row for the range [xmin, xmax] (xmin <= 0 <= xmax, not both 0)."""
    scale = fp16_round((xmax - xmin) / cfg.maxq)
    if cfg.sym:
        return scale, torch.full_like(scale, (cfg.maxq + 1) // 2)
    zero = torch.round(-xmin / scale).clamp(0, cfg.maxq)
    # v1 stores zero - 1, so a zero of 0 cannot be saved. Use zero 1 and widen the step so the grid
    # [-scale, (maxq-1)*scale] still reaches xmax (xmin is above -scale/2 here, so it stays covered).
    low = zero == 0
    if bool(low.any()):
        scale = torch.where(low, fp16_round(xmax / (cfg.maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def grid_codes(x, scale, zero, maxq):
    """Integer codes (as float) of x for scale/zero broadcast against it (one pair per quantizer row)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def find_params(x: torch.Tensor, cfg, weight: torch.Tensor | None = None):
    """Per-row (scale, zero), each x.shape[:-1] float32, for the columns x [..., rows, k] of one group.

    weight (broadcasts against x; [k] or [..., 1, k]): how much an error in each column costs (GPTQ passes
    1 / Hinv[c, c]^2), for the "hessian" search.
    """
    zero_ = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(-1), zero_)  # the range always includes 0
    xmax = torch.maximum(x.amax(-1), zero_)
    if cfg.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # all-zero row: any nonzero scale works, avoid dividing by 0
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    if cfg.search == "hessian":
        return _weighted_params(x, xmin, xmax, cfg, weight)
    if cfg.mse:
        return _mse_params(x, xmin, xmax, cfg)
    return _range_params(xmin, xmax, cfg)


def _weighted_params(x, xmin, xmax, cfg, weight):
    """Try ranges p*[xmin, xmax] for p in 1 and SEARCH_RANGE, keep the lowest weighted squared error per row (the
    first such p on a tie). The candidates are tried together, SEARCH_ELEMENTS values at a time: a handful of
    kernels per group instead of a loop of them per candidate."""
    wt = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    wt, xc = wt.unsqueeze(-2), x.unsqueeze(-2)  # [..., 1, k]: a candidate axis before the columns
    factors = (1.0, *SEARCH_RANGE)
    per = max(1, SEARCH_ELEMENTS.get(x.device.type, SEARCH_ELEMENTS["cpu"]) // max(x.numel(), 1))
    best = None
    for c in range(0, len(factors), per):
        p = torch.tensor(factors[c:c + per], dtype=x.dtype, device=x.device)
        scale, zero = _range_params(xmin.unsqueeze(-1) * p, xmax.unsqueeze(-1) * p, cfg)  # [..., rows, P]
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        err = ((s * (grid_codes(xc, s, z, cfg.maxq) - z) - xc).square_() * wt).sum(-1)
        low, at = err.min(-1, keepdim=True)  # the first minimum: an earlier factor wins a tie
        found = (low.squeeze(-1), scale.gather(-1, at).squeeze(-1), zero.gather(-1, at).squeeze(-1))
        better = found[0] < best[0] if best is not None else None
        best = found if best is None else tuple(torch.where(better, n, o) for n, o in zip(found, best))
    return best[1], best[2]


def _mse_params(x, xmin, xmax, cfg):
    """The reference's shrink search: try ranges p*[xmin, xmax], keep the lowest sum |err|^2.4 per row."""
    best_scale, best_zero = _range_params(xmin, xmax, cfg)
    best = torch.full_like(xmin, math.inf)
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        scale, zero = _range_params(p * xmin, p * xmax, cfg)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        err = (s * (grid_codes(x, s, z, cfg.maxq) - z) - x).abs_().pow_(MSE_NORM).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
