"""verify's verdicts keep a margin from each statistic's own standard error (report.py's noise rule): a
statistic within NOISE_SIGMAS standard errors beyond its limit passes, one further beyond fails."""
from __future__ import annotations

import math

import pytest

from mxtools.verify import report

INT8 = report.thresholds_for("gptq-int8")  # max_ppl_ratio 1.005, max_kld_mean 0.003, min_same_top_p 0.97


def verdict(key: str, value: float, unc_key: str, unc: float) -> list[str]:
    return report.check({key: value, "stats": {unc_key: unc}}, INT8)


def test_the_amd_case_of_issue_9_passes():
    """same_top_p 0.968 on 252 scored tokens (one token = 0.4%) against 0.97: 0.2 standard errors short."""
    unc = math.sqrt(0.968 * 0.032 / 251)
    assert verdict("same_top_p", 0.968, "same_top_p_unc", unc) == []


@pytest.mark.parametrize(("key", "unc_key", "limit", "sign"), [
    ("ppl_ratio", "ppl_ratio_unc", "max_ppl_ratio", 1), ("kld_mean", "kld_unc", "max_kld_mean", 1),
    ("same_top_p", "same_top_p_unc", "min_same_top_p", -1)])
def test_a_limit_fails_only_beyond_two_standard_errors(key, unc_key, limit, sign):
    unc = 1 / 1024  # exact in binary floating point, so the boundary below is exact too
    assert report.NOISE_SIGMAS == 2
    edge = INT8[limit] + sign * 2 * unc
    assert verdict(key, edge, unc_key, unc) == []
    assert verdict(key, edge + sign * unc / 8, unc_key, unc) == [limit]
    assert verdict(key, INT8[limit] + sign * unc / 8, unc_key, 0.0) == [limit]  # no uncertainty: the bare limit


@pytest.mark.parametrize(("key", "unc_key", "limit"), [
    ("ppl_ratio", "ppl_ratio_unc", "max_ppl_ratio"), ("kld_mean", "kld_unc", "max_kld_mean"),
    ("same_top_p", "same_top_p_unc", "min_same_top_p")])
def test_non_finite_statistics_or_uncertainties_never_pass(key, unc_key, limit):
    """A NaN compares false with everything: without care, a NaN statistic (or a NaN standard error, as one scored
    token gives) would pass every limit."""
    inside = INT8[limit] + (0.0 if key != "same_top_p" else 0.001)
    assert verdict(key, math.nan, unc_key, 0.001) == [limit]
    assert verdict(key, math.inf if key != "same_top_p" else -math.inf, unc_key, 0.001) == [limit]
    far = INT8[limit] * (1.5 if key != "same_top_p" else 0.5)
    assert verdict(key, far, unc_key, math.nan) == [limit]  # a NaN error bar gives no margin
    assert verdict(key, inside, unc_key, math.nan) == []
