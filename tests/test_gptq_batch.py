"""GPTQ in batches: several weights with their own Hessians in one set of column loops, weights that share a
Hessian stacked along the rows, and the pipeline's expert batches. Each must give what the weight gets alone.

Exactness: every step is row-wise or a per-weight matrix product, so the results are the same up to float
summation order inside the matrix products, which a BLAS may choose by shape and CPU. On this machine they are
bit-identical, but GPTQ's rounding is chaotic near ties: perturbing these weights by 1e-6 (relative) moves up to
1.9e-3 of the loss and 1.25% of the codes (int8 asym), while quantizing with another weight's Hessian, the
mistake a batch could make, moves the loss by 1.3x or more. So the comparisons allow 2% of the loss and 10% of
the codes, and identical members of one batch must come out bit-identical.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import FixedHessian, small_spec

from mxtools.commands.synth import synth_checkpoint
from mxtools.quant import gptq_pipeline
from mxtools.quant.gptq import GPTQError, QuantConfig, gptq_quantize, gptq_quantize_batch
from mxtools.quant.gptq_groups import quantize_weights

DEFAULTS = QuantConfig(bits=4, group_size=64, damp=0.05, act_group_aware=True, search="hessian", refit=True,
                       repass=True, sweeps=1)
CONFIGS = {
    "defaults": DEFAULTS,
    "plain": QuantConfig(bits=4, group_size=64),
    "act_order": QuantConfig(bits=4, group_size=64, act_order=True, refit=True, sweeps=1, search="hessian"),
    "static_act_order": QuantConfig(bits=4, group_size=64, act_order=True, static_groups=True),
    "channel": QuantConfig(bits=4, group_size=-1, act_group_aware=True, search="hessian", refit=True, repass=True),
    "int8_asym_mse": QuantConfig(bits=8, sym=False, group_size=32, mse=True),
}


def problem(seed: int, out: int = 48, cols: int = 192, dead: int | None = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, cols, generator=g) * (torch.rand(cols, generator=g) * 3 + 0.1)
    if dead is not None:
        x[:, dead] = 0  # a column without signal
    return torch.randn(out, cols, generator=g), x.T @ x / x.shape[0]


def assert_same(a, b, *, rows=slice(None)):
    assert a.method == b.method and a.damp == b.damp
    assert torch.equal(a.g_idx, b.g_idx) and a.scales[:, rows].shape == b.scales.shape
    assert (a.q[rows] == b.q).float().mean() >= 0.9
    if b.loss is not None:
        loss = a.loss if a.row_loss is None else float(a.row_loss[rows].sum())
        assert loss == pytest.approx(b.loss, rel=0.02)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_batch_gives_each_weight_its_own_result(name):
    cfg = CONFIGS[name]
    probs = [problem(s) for s in range(3)]
    batch = gptq_quantize_batch([w for w, _ in probs], [h for _, h in probs], cfg)
    for (w, h), got in zip(probs, batch):
        assert_same(got, gptq_quantize(w, h, cfg))
        assert got.row_loss.shape == (w.shape[0],) and float(got.row_loss.sum()) == pytest.approx(got.loss)


def test_hessians_may_be_given_as_callables_and_a_weight_without_signal_is_rounded():
    (w0, h0), (w1, _) = problem(0), problem(1)
    silent = torch.zeros_like(h0)
    got = gptq_quantize_batch([w0, w1, w0], [lambda: h0, silent, h0.clone], DEFAULTS)
    assert [r.method for r in got] == ["gptq", "rtn", "gptq"]
    assert_same(got[0], gptq_quantize(w0, h0, DEFAULTS))
    assert torch.equal(got[0].q, got[2].q)


def test_stacked_rows_are_the_separate_weights():
    (w, h), (v, _) = problem(0), problem(1, out=32)
    both = gptq_quantize(torch.cat([w, v]), h, DEFAULTS)
    assert_same(both, gptq_quantize(w, h, DEFAULTS), rows=slice(0, 48))
    assert_same(both, gptq_quantize(v, h, DEFAULTS), rows=slice(48, 80))


def test_batches_refuse_mixed_shapes_and_missing_hessians():
    (w, h), (v, _) = problem(0), problem(1, out=32)
    with pytest.raises(ValueError, match="one Hessian per weight"):
        gptq_quantize_batch([w, w], [h], DEFAULTS)
    with pytest.raises(Exception, match="one shape"):
        gptq_quantize_batch([w, v], [h, h], DEFAULTS)


def test_quantize_weights_splits_groups_and_isolates_a_failing_one():
    (w1, h1), (w2, h2), (w3, h3) = (problem(s, out=32) for s in range(3))
    bad = h3.clone()
    bad[5, 5] = float("nan")
    starved = FixedHessian(h2, n_tokens=3)
    jobs = [(FixedHessian(h1), [w1, w2]), (FixedHessian(h2), [w2, w3]), (FixedHessian(bad), [w3, w1]), (starved, [w1])]
    done = quantize_weights(jobs, DEFAULTS, "gptq", min_tokens=10)
    assert [[e["method"] for _, e in group] for group in done] == [["gptq"] * 2, ["gptq"] * 2, ["rtn"] * 2, ["rtn"]]
    assert done[2][0][1]["fallback"].startswith("gptq failed") and done[2][0][1]["loss"] is None
    assert done[3][0][1]["fallback"] == "3 calibration tokens < min_tokens 10" and done[3][0][1]["loss"] is not None
    for (res, entry), w, h in zip(done[0] + done[1], (w1, w2, w2, w3), (h1, h1, h2, h2)):
        assert_same(res, gptq_quantize(w, h, DEFAULTS))
        assert entry["loss"] == pytest.approx(res.loss) and entry["tokens"] == 1000


def chunks(spec, budget, monkeypatch):
    monkeypatch.setattr(gptq_pipeline, "EXPERT_BATCH_CPU_BYTES", budget)

    run = SimpleNamespace(quantizer=None, method="gptq", dev=torch.device("cpu"), ckpt=SimpleNamespace(spec=spec))
    return gptq_pipeline._expert_chunks(run)


def test_expert_batches_follow_the_memory_budget(monkeypatch):
    big = small_spec(dim=4096, hidden_dim=14336, n_experts=8)  # 8x7B's widths
    assert chunks(big, 2 ** 30, monkeypatch) == [[e] for e in range(8)]  # a CPU: one 8x7B expert at a time
    assert chunks(big, 27.5e9, monkeypatch) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # about an 80 GB GPU's half
    assert chunks(big, 60e9, monkeypatch) == [list(range(8))]
    assert chunks(small_spec(), 2 ** 30, monkeypatch) == [list(range(small_spec().n_experts))]


def test_the_pipeline_gives_the_same_weights_in_any_expert_batching(monkeypatch):
    from mxtools.core.bundled import CALIB
    from mxtools.core.tokenizer import Tokenizer
    tokens = Tokenizer.default().encode(CALIB.read_text(encoding="utf-8")[:20000], bos=False)
    spec = small_spec(n_layers=2)

    def run(budget):
        monkeypatch.setattr(gptq_pipeline, "EXPERT_BATCH_CPU_BYTES", budget)
        stream = gptq_pipeline.quantize_checkpoint(synth_checkpoint(spec, seed=3), tokens, DEFAULTS, nsamples=4,
                                                   seqlen=64, device="cpu")
        return {k: v for layer in stream for k, v in layer.results.items()}, stream.report

    alone, report = run(1)  # every expert on its own
    together, report_b = run(2 ** 30)
    assert alone.keys() == together.keys() and len(alone) == 2 * (4 + 3 * spec.n_experts)
    for name in alone:
        assert_same(together[name], alone[name])
    assert ([x["tokens"] for x in report["layers"][1]["experts"]]
            == [x["tokens"] for x in report_b["layers"][1]["experts"]])


def test_gptq_error_names_the_problem():
    w, h = problem(0)
    with pytest.raises(GPTQError, match="NaN"):
        gptq_quantize_batch([w], [torch.full_like(h, float("nan"))], DEFAULTS)
