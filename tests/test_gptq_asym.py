"""The asymmetric objective (GPTAQ: quantize towards the unquantized model's outputs) and coordinate-descent
sweeps over the codes: their algebra on one matrix, and the pipeline's unquantized stream."""
from __future__ import annotations

import pytest
import torch
from conftest import small_spec, write_synth

from mxtools.commands.synth import synth_checkpoint
from mxtools.core.bundled import CALIB
from mxtools.core.errors import MxError
from mxtools.core.tokenizer import Tokenizer
from mxtools.model import forward
from mxtools.quant.gptq import Hessian, QuantConfig, gptaq_target, gptq_quantize, objective
from mxtools.quant.gptq_pipeline import make_samples, quantize_checkpoint


def _inputs(n=600, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.4
    x = x_fp + 0.1 * torch.randn(n, d, generator=g)  # the quantized stream's inputs: x_fp plus an error
    return x_fp, x


def test_cross_hessian_and_asym_target_solve_the_asymmetric_least_squares():
    x_fp, x = _inputs()
    w = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(1))
    hess = Hessian(x.shape[1], cross=True)
    hess.add(x[:250], x_fp[:250])
    hess.add(x[250:], x_fp[250:])
    h, c = hess.matrix(), hess.cross_matrix()
    torch.testing.assert_close(c, 2 * x_fp.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    # alpha 1, no ridge: W' = W C H^-1 is the least-squares solution of min ||X_fp W^T - X W'^T||
    wt = gptaq_target(w, h, c, alpha=1.0, ridge=0.0)
    ls = torch.linalg.lstsq(x.double(), (x_fp @ w.T).double()).solution.T.float()
    torch.testing.assert_close(wt, ls, rtol=1e-3, atol=1e-3)
    # ... so for any Q: ||X_fp W^T - X Q^T||^2 = ||X (W' - Q)^T||^2 + const
    q1, q2 = torch.round(w * 2) / 2, torch.round(w * 3) / 3
    lhs = [float(((x_fp @ w.T - x @ q.T) ** 2).sum()) for q in (q1, q2)]
    rhs = [float(((x @ (wt - q).T) ** 2).sum()) for q in (q1, q2)]
    assert abs((lhs[0] - lhs[1]) - (rhs[0] - rhs[1])) < 1e-3 * abs(lhs[0])
    # alpha 0 or a huge ridge leave W; equal streams leave W
    torch.testing.assert_close(gptaq_target(w, h, c, alpha=0.0), w)
    torch.testing.assert_close(gptaq_target(w, h, h.clone(), alpha=1.0), w)
    assert (gptaq_target(w, h, c, 1.0, 0.9) - w).norm() < (wt - w).norm()


def test_coordinate_descent_sweeps_only_lower_the_objective_and_keep_the_grid():
    _, x = _inputs(n=800, d=256)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    losses = []
    for sweeps in (0, 1, 2, 3):
        cfg = QuantConfig(damp=0.05, act_group_aware=True, search="hessian", refit=True, sweeps=sweeps)
        res = gptq_quantize(w, h, cfg)
        assert res.q.dtype == torch.uint8 and int(res.q.max()) <= 15
        assert torch.equal(res.g_idx, (torch.arange(256) // 128).to(torch.int32))
        losses.append(objective(w, res.dequantize(), h))
        again = gptq_quantize(w, h, cfg)  # deterministic
        assert torch.equal(again.q, res.q) and torch.equal(again.scales, res.scales)
    assert losses[1] < losses[0] and losses[2] <= losses[1] * 1.0001 and losses[3] <= losses[2] * 1.0001
    # the second GPTQ pass on the re-fitted scales: same grid and groups, deterministic
    cfg = QuantConfig(damp=0.05, act_group_aware=True, search="hessian", refit=True, repass=True, sweeps=1)
    res, again = gptq_quantize(w, h, cfg), gptq_quantize(w, h, cfg)
    assert torch.equal(res.q, again.q) and torch.equal(res.scales, again.scales)
    assert int(res.q.max()) <= 15 and torch.equal(res.g_idx, (torch.arange(256) // 128).to(torch.int32))
    assert objective(w, res.dequantize(), h) < losses[0]


def test_pipeline_unquantized_stream_feeds_the_cross_hessians():
    spec = small_spec()
    ckpt = synth_checkpoint(spec, 0, torch.float32)
    tokens = Tokenizer.default().encode(CALIB.read_text(encoding="utf-8")[:8000], bos=False)
    samples, _ = make_samples(tokens, 4, 64)
    cfg = QuantConfig(bits=4, group_size=32)
    plain = list(quantize_checkpoint(ckpt, samples, cfg))
    seen = []
    original = Hessian.add

    def spy(self, x, x_fp=None):
        seen.append(x_fp is not None)
        return original(self, x, x_fp)

    Hessian.add = spy
    try:
        stream = quantize_checkpoint(ckpt, samples, cfg, gptaq=1.0, gptaq_ridge=0.05)
        gptaq = list(stream)
    finally:
        Hessian.add = original
    assert seen and all(seen)
    assert stream.report["gptaq"] == 1.0 and stream.report["totals"]["fallbacks"] == []
    # layer 0's q/k/v see identical streams (both start at the embeddings): same result as without gptaq
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(plain[0].results[name].q, gptaq[0].results[name].q)
    # later layers differ (their quantized-stream inputs carry the earlier layers' errors)
    later = [n for n in plain[-1].results if not torch.equal(plain[-1].results[n].q, gptaq[-1].results[n].q)]
    assert later
    # and the unquantized stream ends at the float model's hidden state
    ref = forward.embed(ckpt, samples, "cpu", torch.float32)
    rope = forward.rope_tables(spec, samples.shape[1], "cpu", torch.float32)
    for i in range(spec.n_layers):
        ref, _ = forward.layer_forward(ref, forward.load_layer(ckpt, i, "cpu", torch.float32), spec, rope)
    torch.testing.assert_close(stream.hidden_float, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stream.hidden, ref, rtol=1e-5, atol=1e-5)


def test_recipes_name_the_sweep_and_gptaq_settings(tmp_path):
    from mxtools.commands.quantize import QuantizeSettings, load_recipe, resolve_settings, run_quantize
    assert resolve_settings()["sweeps"] == 1 and resolve_settings()["repass"] and resolve_settings()["gptaq"] == 0.0
    assert resolve_settings("gptq-int4-g128-nosweep")["sweeps"] == 0
    assert not resolve_settings("gptq-int4-g128-nosweep")["repass"]
    r = load_recipe("gptq-int4-g128-gptaq")
    assert (r["gptaq"], r["gptaq_ridge"], r["sweeps"]) == (0.25, 0.05, 1)
    src = write_synth(tmp_path / "src", "hf", "f32", spec=small_spec())
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    report = run_quantize(src, tmp_path / "q", QuantizeSettings(calib=calib, recipe="gptq-int4-g128-gptaq", nsamples=2,
                                                                seqlen=64, group_size=32, device="cpu"))
    assert (report["gptaq"], report["gptaq_ridge"], report["sweeps"]) == (0.25, 0.05, 1)
    assert report["totals"]["gptq"] == report["totals"]["linears"]


def test_old_recipe_keys_still_read_with_a_warning(tmp_path):
    import logging

    from mxtools.commands.quantize import load_recipe
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("mxtools").addHandler(handler)
    old = tmp_path / "old.yaml"
    old.write_text("asym: 0.5\nasym_ridge: 0.1\n")
    try:
        assert load_recipe(old) == {"gptaq": 0.5, "gptaq_ridge": 0.1}
    finally:
        logging.getLogger("mxtools").removeHandler(handler)
    assert any("recipe key asym is deprecated" in m for m in seen)
    both = tmp_path / "both.yaml"
    both.write_text("asym: 0.5\ngptaq: 0.5\n")
    with pytest.raises(MxError, match="gptaq and its old name asym"):
        load_recipe(both)
