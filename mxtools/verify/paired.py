"""Paired comparison of two candidates judged on the same chunks of the same text.

Per-token KLD is heavy-tailed and strongly correlated within a chunk, and two quantizations of one model err on
the same hard chunks, so the standard error of each mean alone (verify's `kld_unc`) overstates how well their
difference is known. Here the unit is the chunk: with a_i and b_i the two candidates' mean KLDs on chunk i
(verify's `stats.chunk_kld`), the difference is judged by the standard error of the mean of d_i = a_i - b_i, and
the ratio mean(a) / mean(b) by the delta method:
    SE(ratio)^2 ~ (var(a) - 2 r cov(a, b) + r^2 var(b)) / (n mean(b)^2),   r = mean(a) / mean(b),
which is the standard error of the mean of (a_i - r b_i) / mean(b).
"""
from __future__ import annotations

import math

import numpy as np


def paired(a, b) -> dict:
    """Compare per-chunk values `a` and `b` (same chunks, same order): their means, the mean difference a - b with
    its standard error, and the ratio mean(a) / mean(b) with its delta-method standard error (None for fewer
    than two chunks or mean(b) == 0)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"a paired comparison needs two equally long, non-empty lists of per-chunk values "
                         f"(got {x.size} and {y.size})")
    n = x.size
    ma, mb = float(x.mean()), float(y.mean())
    out = {"n": n, "mean_a": ma, "mean_b": mb, "diff": ma - mb, "diff_se": None, "ratio": None, "ratio_se": None}
    if mb != 0:
        out["ratio"] = ma / mb
    if n < 2:
        return out
    out["diff_se"] = float((x - y).std(ddof=1)) / math.sqrt(n)
    if mb != 0:
        out["ratio_se"] = float((x - out["ratio"] * y).std(ddof=1)) / (math.sqrt(n) * abs(mb))
    return out


def paired_reports(a: dict, b: dict) -> dict:
    """`paired` on two verify reports of the same text and chunks (their `stats.chunk_kld`)."""
    ca, cb = a.get("stats", {}).get("chunk_kld"), b.get("stats", {}).get("chunk_kld")
    if ca is None or cb is None:
        raise ValueError("both reports need per-chunk KLDs (a verify report judged against a reference or base)")
    return paired(ca, cb)
