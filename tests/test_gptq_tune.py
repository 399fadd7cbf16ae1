"""Block-output reconstruction after GPTQ (quant/gptq_tune.py): it starts exactly at GPTQ's solution, keeps the
codes on GPTQ's grid (zeros, g_idx and, unless tuned, scales unchanged), lowers the held-out layer output error,
and the pipeline's next layer is calibrated on the tuned layer's real output."""
from __future__ import annotations

import pytest
import torch
from conftest import small_spec

from mxtools.commands.synth import synth_checkpoint
from mxtools.core.bundled import CALIB
from mxtools.core.names import weight_name
from mxtools.core.tensors import Checkpoint, LazyTensor
from mxtools.core.tokenizer import Tokenizer
from mxtools.model import forward
from mxtools.quant.gptq import QuantConfig
from mxtools.quant.gptq_pipeline import make_samples, quantize_checkpoint
from mxtools.quant.gptq_tune import MIN_TRAIN, TuneConfig, _Rounding

CFG = QuantConfig(bits=4, group_size=32, damp=0.05, act_group_aware=True, search="hessian", refit=True)


@pytest.fixture(scope="module")
def samples():
    tokens = Tokenizer.default().encode(CALIB.read_text(encoding="utf-8")[:200000], bos=False)
    return make_samples(tokens, 48, 128)[0]


# Two experts, one per token: enough calibration tokens per weight that the tuned rounding generalises.
SPEC = small_spec(n_layers=1, n_experts=2, n_experts_per_tok=1)


def run(ckpt, samples, tune: TuneConfig | None):
    stream = quantize_checkpoint(ckpt, samples, CFG, tune=tune)
    layers = list(stream)
    return {k: v for lq in layers for k, v in lq.results.items()}, stream


def test_rounding_starts_at_gptqs_solution(samples):
    ckpt = synth_checkpoint(SPEC, 0, torch.float32)
    results, _ = run(ckpt, samples, None)
    for name, res in results.items():
        w = ckpt.tensors[name].load()
        r = _Rounding(w, res, torch.device("cpu"), scales=True, codes=True)
        assert torch.equal(r.weight().detach(), res.dequantize())  # V = 0, scale factor 1: GPTQ's weight
        same = r.result()
        assert torch.equal(same.q, res.q) and torch.equal(same.scales, res.scales)


def test_tuning_lowers_the_held_out_error_and_keeps_the_grid(samples):
    ckpt = synth_checkpoint(SPEC, 0, torch.float32)
    gptq, _ = run(ckpt, samples, None)
    # Held-out error after / before, measured: 0.90, 0.91 and 0.83.
    for scales, codes, limit in ((True, False, 0.97), (False, True, 0.95), (True, True, 0.9)):
        tuned, stream = run(ckpt, samples, TuneConfig(iters=100, batch=4, holdout=8, scales=scales, codes=codes))
        t = stream.report["layers"][0]["tune"]
        assert t["kept"] and t["holdout_after"] < limit * t["holdout_before"], t
        assert t["best_step"] % 25 == 0 and 0 < t["best_step"] <= 100
        assert (0 < t["codes_changed"] < 0.2) if codes else t["codes_changed"] == 0
        assert stream.report["tune_iters"] == 100 and stream.report["tune_scales"] == scales
        assert stream.report["tune_codes"] == codes
        for name, res in tuned.items():
            ref = gptq[name]
            assert torch.equal(res.zeros, ref.zeros) and torch.equal(res.g_idx, ref.g_idx)
            assert res.q.dtype == torch.uint8 and int(res.q.max()) <= CFG.maxq
            assert int((res.q.int() - ref.q.int()).abs().max()) <= (1 if codes else 0)  # at most to a neighbour
            if scales:
                assert torch.equal(res.scales, res.scales.half().float())  # fp16 values, as the checkpoint stores
            else:
                assert torch.equal(res.scales, ref.scales)
    # The hidden state handed to the next layer is the tuned layer's real output.
    fake = dict(ckpt.tensors)
    for name, res in tuned.items():
        fake[name] = LazyTensor(name, fake[name].shape, torch.float32, lambda r=res: r.dequantize())
    w = forward.load_layer(Checkpoint(ckpt.spec, fake, "fake", ckpt.path), 0, "cpu", torch.float32)
    h = forward.embed(ckpt, forward.as_tokens(samples, ckpt.spec, "cpu"), "cpu", torch.float32)
    rope = forward.rope_tables(ckpt.spec, samples.shape[1], "cpu", torch.float32)
    assert torch.allclose(stream.hidden, forward.layer_forward(h, w, ckpt.spec, rope)[0], atol=1e-5)


def test_a_tuning_that_hurts_the_held_out_error_is_dropped(samples):
    """Steps far too large scramble the rounding: the held-out error rises and GPTQ's results are kept as they are."""
    ckpt = synth_checkpoint(SPEC, 0, torch.float32)
    gptq, _ = run(ckpt, samples, None)
    tuned, stream = run(ckpt, samples, TuneConfig(iters=10, lr=0.3, batch=4, holdout=8, check=5, codes=True))
    t = stream.report["layers"][0]["tune"]
    assert not t["kept"] and t["holdout_after"] > t["holdout_before"] and t["codes_changed"] == 0
    for name, res in tuned.items():
        assert torch.equal(res.q, gptq[name].q) and torch.equal(res.scales, gptq[name].scales)


def test_too_few_samples_skip_the_tuning(samples):
    """With fewer than MIN_TRAIN training sequences the rounding would fit the calibration text: GPTQ's results."""
    ckpt = synth_checkpoint(SPEC, 0, torch.float32)
    few = samples[:MIN_TRAIN + 7]  # 8 held out: one short
    gptq, _ = run(ckpt, few, None)
    tuned, stream = run(ckpt, few, TuneConfig(iters=5))
    assert stream.report["layers"][0]["tune"]["skipped"].startswith(f"{MIN_TRAIN - 1} training samples")
    for name, res in tuned.items():
        assert torch.equal(res.q, gptq[name].q) and torch.equal(res.scales, gptq[name].scales)


def test_targets_start_from_the_float_embedding_when_the_stream_starts_from_a_quantized_one(samples):
    """With a quantized token embedding (as `quantize --to gguf` sets it) the quantized stream starts from that
    table, but the targets are the float model's: layer 0's is the float layer on the float table's embeddings."""
    ckpt = synth_checkpoint(SPEC, 0, torch.float32)
    cfg = TuneConfig(iters=2, batch=4)
    stream = quantize_checkpoint(ckpt, samples, CFG, tune=cfg)
    table = forward.load_weight(ckpt, weight_name("token_embd"), "cpu", torch.float32)
    stream.embedding = table + 0.5 * table.std() * torch.randn(table.shape, generator=torch.Generator().manual_seed(0))
    next(iter(stream))
    toks = forward.as_tokens(samples, ckpt.spec, "cpu")[:, :cfg.window]
    w = forward.load_layer(ckpt, 0, "cpu", torch.float32)
    rope = forward.rope_tables(ckpt.spec, toks.shape[1], "cpu", torch.float32)
    expected = forward.layer_forward(forward.embed(ckpt, toks, "cpu", torch.float32), w, ckpt.spec, rope)[0]
    assert torch.allclose(stream.run.tune_ref, expected, atol=1e-5)
