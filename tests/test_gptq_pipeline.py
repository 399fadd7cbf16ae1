"""The layer-by-layer GPTQ pipeline: every Linear quantized, one layer loaded at a time, each layer calibrated on
the quantized previous layer, starved / never-routed experts handled, GPTQ beating RTN, samples and recipes."""
from __future__ import annotations

import pytest
import torch
from conftest import FixedHessian, small_spec

from mxtools.commands.quantize import load_recipe, resolve_settings
from mxtools.commands.synth import synth_checkpoint
from mxtools.core import names
from mxtools.core.bundled import CALIB
from mxtools.core.errors import MxError
from mxtools.core.names import weight_name
from mxtools.core.tensors import Checkpoint, LazyTensor
from mxtools.core.tokenizer import Tokenizer
from mxtools.model import forward
from mxtools.quant.gptq import QuantConfig
from mxtools.quant.gptq_groups import quantize_weights
from mxtools.quant.gptq_pipeline import (
    QUANTIZED_KINDS,
    make_samples,
    quantize_checkpoint,
)

CFG = QuantConfig(bits=4, group_size=32)  # small_spec: dim 64, hidden 128


@pytest.fixture(scope="module")
def tokens():
    return Tokenizer.default().encode(CALIB.read_text(encoding="utf-8")[:20000], bos=False)


def synth(spec=None, **edits) -> Checkpoint:
    """An in-memory fp32 synth Mixtral; `edits` maps canonical names to replacement tensors."""
    ckpt = synth_checkpoint(spec or small_spec(), 0, torch.float32)
    for name, value in edits.items():
        ckpt.tensors[name] = LazyTensor(name, tuple(value.shape), torch.float32, lambda v=value: v.clone())
    return ckpt


def fake_quantized(ckpt: Checkpoint, results: dict) -> Checkpoint:
    """ckpt with every quantized weight replaced by its dequantized (fake-quantized) value."""
    tensors = dict(ckpt.tensors)
    for name, res in results.items():
        tensors[name] = LazyTensor(name, tensors[name].shape, torch.float32, lambda r=res: r.dequantize())
    return Checkpoint(ckpt.spec, tensors, "fake", ckpt.path)


def quantized_names(spec, i) -> set[str]:
    return {weight_name(k, i, e) for k in QUANTIZED_KINDS
            for e in ([None] if names.KIND_BY_KEY[k].scope == "layer" else range(spec.n_experts))}


def test_layer_by_layer_every_linear_quantized_on_quantized_inputs(tokens):
    ckpt = synth()
    loads = []
    for name, lazy in list(ckpt.tensors.items()):
        ckpt.tensors[name] = lazy.map(lambda t, n=name: loads.append(n) or t)
    samples, _ = make_samples(tokens, 4, 64)
    stream = quantize_checkpoint(ckpt, samples, CFG)
    results, hidden = {}, []
    for lq in stream:
        layers_loaded = {names.parse(n)[1] for n in loads} - {None}
        assert layers_loaded == set(range(lq.index + 1))  # nothing of layer i+1 loaded before layer i is done
        assert set(lq.results) == quantized_names(ckpt.spec, lq.index)
        assert all(r.method == "gptq" for r in lq.results.values())
        results.update(lq.results)
        hidden.append(stream.hidden.clone())
    layer_names = [n for n in loads if names.parse(n)[1] is not None]
    assert sorted(layer_names) == sorted(set(layer_names))  # every layer weight loaded once
    assert [names.parse(n)[1] for n in layer_names] == sorted(names.parse(n)[1] for n in layer_names)
    # Layer i's output (the input of layer i+1) is the quantized model's, not the float model's.
    fake = fake_quantized(ckpt, results)
    pairs = zip(forward.iter_layers(fake, samples, "cpu"), forward.iter_layers(ckpt, samples, "cpu"))
    for (i, h_q, _), (_, h_f, _) in pairs:
        assert torch.allclose(hidden[i], h_q, atol=1e-5, rtol=0)
        assert (hidden[i] - h_f).abs().max() > 100 * (hidden[i] - h_q).abs().max() + 1e-3
    assert stream.report["totals"]["linears"] == 2 * (4 + 3 * ckpt.spec.n_experts)
    assert stream.report["totals"]["gptq"] == stream.report["totals"]["linears"]


def dead_expert_router(spec, dead: int) -> torch.Tensor:
    """Router rows with r1 = -r0, r4 = -r2 and r_dead = 0: two logits are > 0 for every token, so `dead`
    (logit 0) never makes the top 2."""
    r = synth(spec).tensors[weight_name("ffn_gate_inp", 0)].load().clone()
    r[1], r[4], r[dead] = -r[0], -r[2], 0
    return r


def test_never_routed_expert_falls_back_to_rtn_and_all_mode_calibrates_it(tokens):
    spec = small_spec(n_layers=1, n_experts=5)
    ckpt = synth(spec, **{weight_name("ffn_gate_inp", 0): dead_expert_router(spec, 3)})
    samples, _ = make_samples(tokens, 4, 64)
    for experts in ("routed", "all"):
        stream = quantize_checkpoint(ckpt, samples, CFG, experts=experts)
        results = {k: v for lq in stream for k, v in lq.results.items()}
        x3 = stream.report["layers"][0]["experts"][3]
        assert x3["tokens"] == 0  # routing is the normal one in both modes
        w1 = results[weight_name("ffn_gate", 0, 3)]
        assert w1.dequantize().abs().sum() > 0  # never zeroed
        fake = fake_quantized(ckpt, results)
        assert torch.allclose(stream.hidden, forward.last_hidden(fake, samples, "cpu"), atol=1e-5, rtol=0)
        if experts == "routed":
            assert x3["method"] == "rtn" and "0 calibration tokens" in x3["w1"]["fallback"]
            assert stream.report["totals"]["experts_rtn"] == ["layer 0 expert 3 (0 tokens)"]
            assert w1.method == "rtn"
        else:
            assert x3["method"] == "gptq" and x3["hessian_tokens"] == samples.numel()
            assert w1.method == "gptq" and stream.report["totals"]["experts_rtn"] == []
        others = [x for x in stream.report["layers"][0]["experts"] if x["expert"] != 3]
        assert all(x["method"] == "gptq" and x["tokens"] > 0 for x in others)


def test_starved_experts_fall_back_below_min_tokens(tokens):
    ckpt = synth(small_spec(n_layers=1))
    samples, _ = make_samples(tokens, 2, 64)
    stream = quantize_checkpoint(ckpt, samples, CFG)
    list(stream)
    routed = sorted(x["tokens"] for x in stream.report["layers"][0]["experts"])
    threshold = (routed[0] + routed[-1]) // 2 + 1
    stream = quantize_checkpoint(ckpt, samples, CFG, min_tokens=threshold)
    list(stream)
    for x in stream.report["layers"][0]["experts"]:
        assert x["method"] == ("rtn" if x["tokens"] < threshold else "gptq"), x
    assert stream.report["totals"]["experts_rtn"]  # at least the least-routed expert
    assert stream.report["totals"]["rtn"] == 3 * len(stream.report["totals"]["experts_rtn"])


def test_failed_cholesky_raises_damping_or_falls_back_and_is_reported():
    w = torch.randn(16, 64)
    h = torch.eye(64)
    h[5, 5] = -0.015  # indefinite: damping 0.01 x mean(diag) ~ 0.01 is not enough, 0.02 is
    res, entry = quantize_weights([(FixedHessian(h), [w])], CFG, "gptq", min_tokens=10)[0][0]
    assert res.method == "gptq" and entry["damp_raised"] and entry["damp"] > CFG.damp
    h[5, 5] = float("nan")  # no damping helps: round to nearest, reported, weight kept
    res, entry = quantize_weights([(FixedHessian(h), [w])], CFG, "gptq", min_tokens=10)[0][0]
    assert res.method == "rtn" and entry["fallback"].startswith("gptq failed") and entry["loss"] is None
    assert (res.dequantize() - w).abs().max() < w.abs().max() / 7


def test_gptq_has_lower_layer_output_error_than_rtn(tokens):
    ckpt = synth(small_spec(n_layers=1))
    samples, _ = make_samples(tokens, 4, 64)
    ref = forward.last_hidden(ckpt, samples, "cpu")
    err = {}
    for method in ("gptq", "rtn"):
        results = {k: v for lq in quantize_checkpoint(ckpt, samples, CFG, method) for k, v in lq.results.items()}
        err[method] = float((forward.last_hidden(fake_quantized(ckpt, results), samples, "cpu") - ref).pow(2).mean())
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_make_samples_bos_first_spread_and_short_text():
    toks = list(range(10, 10 + 1000))
    s, info = make_samples(toks, 4, 100, bos_id=1)
    assert s.shape == (4, 100) and (s[:, 0] == 1).all()
    assert s[0, 1] == 10 and s[-1, -1] == toks[10 * 99 - 1]  # first and last windows of the 10 available
    assert info == {"samples": 4, "requested": 4, "seqlen": 100, "calib_tokens": 1000, "short": False}
    s, info = make_samples(toks, 128, 100)
    assert s.shape == (10, 100) and info["short"] and info["samples"] == 10
    with pytest.raises(MxError, match="fewer than one sample"):
        make_samples(toks[:50], 4, 100)
    ready = torch.ones(3, 16, dtype=torch.long)
    assert make_samples(ready, 2, 999)[0].shape == (2, 16)


def test_bad_settings_are_refused_up_front():
    ckpt = synth()
    with pytest.raises(MxError, match="does not divide"):
        quantize_checkpoint(ckpt, None, QuantConfig(group_size=48), "rtn")
    with pytest.raises(MxError, match="unknown method"):
        quantize_checkpoint(ckpt, None, CFG, "awq")
    with pytest.raises(MxError, match="unknown experts mode"):
        quantize_checkpoint(ckpt, None, CFG, experts="some")


def test_recipes_load_and_options_override():
    r = load_recipe("gptq-int4-g128")
    assert {k: r[k] for k in ("bits", "group_size", "sym", "damp", "act_order", "act_group_aware", "search", "refit",
                              "experts", "nsamples", "seqlen")} == \
        dict(bits=4, group_size=128, sym=True, damp=0.05, act_order=False, act_group_aware=True, search="hessian",
             refit=True, experts="routed", nsamples=128, seqlen=2048)
    assert resolve_settings("gptq-int4-g128") == resolve_settings()  # the default recipe is the defaults
    assert load_recipe("gptq-int4-g128-actorder")["act_order"] is True
    assert QuantConfig(**{k: v for k, v in resolve_settings("gptq-int4-g128-plain").items()
                          if k in QuantConfig.__dataclass_fields__}) == QuantConfig()  # plain GPTQ as the reference
    assert load_recipe("gptq-int8-g128")["bits"] == 8
    assert load_recipe("rtn-int4-g128")["method"] == "rtn"
    s = resolve_settings("gptq-int8-g128", bits=4, group_size=None, nsamples=16)
    assert (s["bits"], s["group_size"], s["nsamples"]) == (4, 128, 16)
    with pytest.raises(MxError, match="no recipe"):
        load_recipe("gptq-int3")
