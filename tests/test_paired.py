"""The paired standard errors of verify/paired.py against their definitions computed another way (a covariance
matrix and the delta method's gradient), and the per-chunk KLDs verify reports for them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mxtools.verify.metrics import Accumulator
from mxtools.verify.paired import paired, paired_reports


def test_difference_and_ratio_match_the_delta_method():
    rng = np.random.default_rng(7)
    b = rng.lognormal(-7, 0.8, 120)
    a = 0.8 * b * rng.lognormal(0, 0.2, 120)  # correlated, as two quantizations of one model are
    r = paired(a, b)
    n = a.size
    cov = np.cov(np.stack([a, b]), ddof=1) / n  # covariance matrix of the two means
    grad = np.array([1 / b.mean(), -a.mean() / b.mean() ** 2])  # d(ma/mb)/d(ma, mb)
    assert r["n"] == n and r["ratio"] == pytest.approx(a.mean() / b.mean(), rel=1e-12)
    assert r["ratio_se"] == pytest.approx(math.sqrt(grad @ cov @ grad), rel=1e-9)
    assert r["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert r["diff_se"] == pytest.approx(math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-9)
    # Pairing removes the shared chunk difficulty: the paired SE is well under the unpaired one.
    assert r["diff_se"] < 0.5 * math.sqrt(cov[0, 0] + cov[1, 1])


def test_exact_multiples_have_no_ratio_uncertainty_and_bad_input_is_refused():
    b = [1e-3, 2e-3, 5e-4, 3e-3]
    r = paired([2 * x for x in b], b)
    assert r["ratio"] == pytest.approx(2) and r["ratio_se"] == pytest.approx(0, abs=1e-12)
    one = paired([1.0], [2.0])
    assert one["ratio"] == 0.5 and one["diff_se"] is None and one["ratio_se"] is None
    assert paired([1.0, 2.0], [0.0, 0.0])["ratio"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="per-chunk"):
        paired_reports({"stats": {}}, {"stats": {"chunk_kld": [1.0]}})


def test_the_accumulator_reports_each_chunks_mean_kld():
    torch.manual_seed(0)
    acc = Accumulator()
    tokens = []
    for _ in range(3):
        base = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), -1)
        cand = torch.log_softmax(base + 0.3 * torch.randn(5, 11, dtype=torch.float64), -1)
        kld = (base.exp() * (base - cand)).sum(-1)
        tokens.append(kld)
        acc.add(cand, torch.zeros(5, dtype=torch.long), base)
    res = acc.result()
    assert res["chunk_kld"] == pytest.approx([float(k.mean()) for k in tokens], rel=1e-6)
    assert np.mean(res["chunk_kld"]) == pytest.approx(res["kld_mean"], rel=1e-6)  # equal chunks: same mean
