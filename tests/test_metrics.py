"""Perplexity/KLD statistics (llama.cpp protocol), the saved base file, lockstep and verify()."""
import math

import numpy as np
import pytest
import torch
from hf_tiny import (
    checkpoint_from_hf,
    checkpoint_from_state,
    expert_name,
    modified,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_hf_model,
)

from mxtools.core import chunking, names, transforms
from mxtools.core.errors import FormatError
from mxtools.model import forward
from mxtools.quant.mixes import MIXES
from mxtools.verify import (
    BaseMismatchError,
    load_base,
    lockstep,
    metrics,
    render_text,
    report,
    verify,
)


def _logp(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float32))


# ---------------------------------------------------------------- statistics on hand-made log-probs

def test_identical_distributions_give_zero_kld_and_ratio_one():
    lp = torch.log_softmax(torch.randn(30, 50, generator=torch.Generator().manual_seed(0)), -1)
    t = torch.randint(0, 50, (30,))
    r = metrics.compare([lp], [t], [lp.clone()])
    assert r["kld_mean"] == 0 and r["kld_percentiles"]["max"] == 0
    assert r["same_top_p"] == 1 and r["ppl_ratio"] == 1 and r["dp_rms"] == 0
    assert r["ppl"] == pytest.approx(r["ppl_base"])
    assert r["ln_ppl_cor"] == pytest.approx(1.0)


def test_known_kld_of_two_small_distributions():
    base = _logp([[0.5, 0.5], [0.25, 0.75]])
    cand = _logp([[0.9, 0.1], [0.25, 0.75]])
    v = metrics.token_stats(cand, torch.tensor([1, 1]), base)
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    assert v["kld"][0].item() == pytest.approx(want, rel=1e-6)
    assert v["kld"][1].item() == pytest.approx(0.0, abs=1e-9)
    assert v["p_diff"].tolist() == pytest.approx([0.1 - 0.5, 0.0], abs=1e-6)


def test_same_top_share_and_its_uncertainty():
    base = _logp([[0.6, 0.4]] * 4)
    cand = _logp([[0.7, 0.3]] * 3 + [[0.3, 0.7]])
    r = metrics.compare([cand], [torch.zeros(4, dtype=torch.long)], [base])
    assert r["same_top_p"] == 0.75
    assert r["same_top_p_unc"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_uniform_distribution_has_perplexity_vocab_size():
    lp = torch.full((20, 37), -math.log(37))
    r = metrics.compare([lp, lp], [torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    assert r["ppl"] == pytest.approx(37, rel=1e-6) and r["n_tokens"] == 40
    assert r["ppl_unc"] == 0 and "kld_mean" not in r


def test_uncertainties_and_percentiles_follow_llama_cpp():
    x = np.arange(1, 101, dtype=float) / 100
    mean, unc = metrics.mean_and_uncertainty(x.sum(), (x ** 2).sum(), 100)
    assert mean == pytest.approx(x.mean()) and unc == pytest.approx(x.std() / math.sqrt(99))
    assert metrics.mean_and_uncertainty(5.0, 30.0, 10)[1] == 0  # 10 values or fewer: no uncertainty
    assert metrics.percentile(x, 0.5) == pytest.approx(0.505)  # interpolated between 0.50 and 0.51
    assert metrics.percentile(x, 0.999) == pytest.approx(0.99 + 0.901 * 0.01)
    assert metrics.percentile(x, 0.0) == 0.01 and metrics.percentile(x, 1.0) == 1.0


def test_chunking_protocol_counts_scored_tokens():
    tokens = list(range(10, 1010))  # 1000 tokens
    table = chunking.chunk_tokens(tokens, 64)
    assert table.shape == (15, 64)  # the partial 16th chunk is dropped
    assert chunking.chunk_tokens(tokens, 64, chunks=4).shape == (4, 64)
    fed = chunking.with_bos(table)
    assert (fed[:, 0] == 1).all() and (fed[:, 1:] == table[:, 1:]).all() and table[1, 0] == 74
    pos = chunking.scored_positions(64)
    assert (pos.start, pos.stop) == (32, 63) and chunking.n_scored(64) == 31 == 64 - 1 - 64 // 2
    assert chunking.scored_targets(table[2]).tolist() == list(range(10 + 128 + 33, 10 + 192))
    lp = torch.full((31, 2000), -math.log(2000))
    r = metrics.compare([lp] * 15, [chunking.scored_targets(c) for c in table])
    assert r["n_tokens"] == 15 * 31
    with pytest.raises(Exception, match="fewer than one chunk"):
        chunking.chunk_tokens(tokens[:50], 64)


# ---------------------------------------------------------------- saved base file

def _chunk_logps(n, seed=0, p=19, v=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(3 * torch.randn(p, v, generator=g), -1) for _ in range(n)]


def test_base_roundtrip_u16_is_exact_enough_and_f32_exact(tmp_path):
    table = torch.randint(0, 300, (3, 40))
    lps = _chunk_logps(3)
    metrics.save_base(tmp_path / "b16", table, lps, 300)
    metrics.save_base(tmp_path / "b32", table, lps, 300, encoding="f32")
    b16, b32 = load_base(tmp_path / "b16"), load_base(tmp_path / "b32")
    assert b16.n_ctx == 40 and (b16.tokens == table.numpy()).all()
    assert torch.equal(b32.chunk(1), lps[1])
    targets = [chunking.scored_targets(c) for c in table]
    r = metrics.compare(lps, targets, [b16.chunk(i) for i in range(3)])
    # u16 rounding costs ~step^2/24 ~ 1e-8 per token (KLD is second order around the base)
    assert r["kld_percentiles"]["min"] > -1e-12 and r["kld_mean"] < 1e-7 and r["kld_percentiles"]["max"] < 1e-6
    assert (b16.chunk(0) - lps[0]).abs().max() < 5e-4
    other = _chunk_logps(3, seed=1)
    exact = metrics.compare(other, targets, lps)["kld_mean"]
    assert metrics.compare(other, targets, [b16.chunk(i) for i in range(3)])["kld_mean"] == pytest.approx(exact,
                                                                                                         rel=1e-4)
    assert (tmp_path / "b16").stat().st_size < (tmp_path / "b32").stat().st_size * 0.6


def test_base_mismatch_and_corruption_are_refused(tmp_path):
    table = torch.randint(0, 300, (3, 40))
    path = metrics.save_base(tmp_path / "b", table, _chunk_logps(3), 300)
    base = load_base(path)
    base.check(table[:2], 300)  # fewer chunks of the same text is fine
    changed = table.clone()
    changed[1, 7] += 1
    with pytest.raises(BaseMismatchError, match="position 47"):
        base.check(changed, 300)
    with pytest.raises(BaseMismatchError, match="ctx 40"):
        base.check(table.reshape(6, 20), 300)
    with pytest.raises(BaseMismatchError, match="vocabulary"):
        base.check(table, 301)
    old = tmp_path / "old"  # saved before verify cut llama.cpp's chunks (BOS first in the stream)
    old.write_bytes(path.read_bytes().replace(b'"version": 2', b'"version": 1', 1))
    with pytest.raises(BaseMismatchError, match="version 1, now 2"):
        load_base(old).check(table, 300)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated"):
        load_base(path)
    (tmp_path / "x").write_bytes(b"nonsense" * 10)
    with pytest.raises(FormatError, match="not an mxtools base"):
        load_base(tmp_path / "x")


def test_incomplete_base_leaves_no_file(tmp_path):
    table = torch.randint(0, 300, (3, 40))
    with pytest.raises(ValueError, match="1 of 3"):
        metrics.save_base(tmp_path / "b", table, _chunk_logps(1), 300)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- lockstep and verify on a tiny model

@pytest.fixture(scope="module")
def tiny():
    return checkpoint_from_hf(tiny_hf_model(n_layers=3, n_experts=8))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(3)).tolist()


def test_verify_against_itself_is_perfect(tiny, tokens, tmp_path):
    r = verify(tiny, tiny, tokens, ctx=40, device="cpu")
    assert r["kld_mean"] == 0 and r["ppl_ratio"] == 1 and r["same_top_p"] == 1
    assert r["first_divergent_layer"] is None and r["passed"] and r["failures"] == []
    assert r["stats"]["n_tokens"] == 5 * 19 and len(r["layers"]) == 3
    assert all(s["rel_error"] == 0 and s["cosine"] == pytest.approx(1) for s in r["layers"])
    assert {"ppl", "ppl_base", "ppl_ratio", "kld_mean", "same_top_p", "first_divergent_layer", "passed",
            "layers", "thresholds", "failures"} <= set(r)
    assert "PASSED" in render_text(r)
    report.plot(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_unpermuted_k_projection_in_layer_0_is_located(tiny, tokens):
    k = names.fill(names.KIND_BY_KEY["attn_k"].template, 0)
    bad = modified(tiny, {k: transforms.hf_to_meta_rope(tiny.tensors[k].load(), tiny.spec.n_kv_heads)})
    r = verify(bad, tiny, tokens, ctx=40, device="cpu")
    assert r["first_divergent_layer"] == 0 and r["divergent_sublayer"] == "attention"
    assert not r["passed"] and "first_divergent_layer" in r["failures"] and r["kld_mean"] > 0.01


def test_swapped_experts_in_layer_1_are_located(tiny, tokens):
    fed = chunking.with_bos(chunking.chunk_tokens(tokens, 40))
    top = [t for i, _, t in forward.iter_layers(tiny, fed, "cpu")][1]
    counts = torch.bincount(top.reshape(-1), minlength=8)
    a, b = counts.argsort(descending=True)[:2].tolist()  # the two busiest experts of layer 1
    assert counts[b] > 10
    swap = {}
    for w in ("w1", "w2", "w3"):
        swap[expert_name(1, a, w)] = tiny.tensors[expert_name(1, b, w)].load()
        swap[expert_name(1, b, w)] = tiny.tensors[expert_name(1, a, w)].load()
    r = verify(modified(tiny, swap), tiny, tokens, ctx=40, device="cpu")
    assert r["first_divergent_layer"] == 1 and r["divergent_sublayer"] == "moe"
    assert r["layers"][0]["rel_error"] == 0 and r["layers"][1]["moe_error"] > 0.5


def _round_to_nearest(ckpt, bits):
    """Blockwise (32) symmetric round-to-nearest of every Linear but the router: a stand-in for q8_0 / q4_0."""
    def q(w):
        o, i = w.shape
        blk = w.reshape(o, i // 32, 32)
        top = 2 ** (bits - 1) - 1
        d = (blk.abs().amax(-1, keepdim=True) / top).clamp_min(1e-12)
        return (torch.round(blk / d).clamp(-top - 1, top) * d).reshape(o, i)
    state = {}
    for n, t in ckpt.tensors.items():
        kind = names.parse(n)[0]
        state[n] = q(t.load()) if kind.linear and kind.key != "ffn_gate_inp" else t.load()
    return checkpoint_from_state(ckpt.spec, state)


@pytest.mark.parametrize("bits,outtype", [(8, "q8_0"), (4, "q4_0")])
def test_healthy_quantization_is_not_flagged(tiny, tokens, bits, outtype):
    r = verify(_round_to_nearest(tiny, bits), tiny, tokens, ctx=40, device="cpu", outtype=outtype)
    assert r["first_divergent_layer"] is None
    errs = [s["rel_error"] for s in r["layers"]]
    assert errs[0] > 0 and errs[-1] > errs[0]  # free-running error grows through the stack ...
    assert max(max(s["attn_error"], s["moe_error"]) for s in r["layers"]) < r["thresholds"]["max_layer_error"]
    assert r["kld_mean"] > 0


def test_saved_base_gives_the_lockstep_numbers(tiny, tokens, tmp_path):
    k = names.fill(names.KIND_BY_KEY["attn_k"].template, 0)
    bad = modified(tiny, {k: transforms.hf_to_meta_rope(tiny.tensors[k].load(), tiny.spec.n_kv_heads)})
    live = verify(bad, tiny, tokens, ctx=40, device="cpu", save_base=tmp_path / "ref.base")
    again = verify(bad, None, tokens, ctx=40, device="cpu", base=tmp_path / "ref.base", thresholds="f32")
    assert again["kld_mean"] == pytest.approx(live["kld_mean"], rel=1e-4)
    assert again["ppl_base"] == pytest.approx(live["ppl_base"], rel=1e-4)
    assert again["layers"] == [] and again["first_divergent_layer"] is None
    assert "max_kld_mean" in again["failures"]
    # base recorded from a reference-free run of the reference itself: same file contents
    verify(tiny, None, tokens, ctx=40, device="cpu", save_base=tmp_path / "self.base")
    assert (tmp_path / "self.base").read_bytes() == (tmp_path / "ref.base").read_bytes()
    with pytest.raises(BaseMismatchError):
        verify(bad, None, tokens[1:], ctx=40, device="cpu", base=tmp_path / "ref.base")


def test_chunk_groups_pool_to_the_same_report(tiny, tokens):
    k = names.fill(names.KIND_BY_KEY["attn_k"].template, 2)
    bad = modified(tiny, {k: tiny.tensors[k].load() * 1.5})
    one = verify(bad, tiny, tokens, ctx=40, device="cpu")
    two = verify(bad, tiny, tokens, ctx=40, device="cpu", chunks_per_pass=2)
    assert one["kld_mean"] > 1e-4
    assert two["kld_mean"] == pytest.approx(one["kld_mean"], rel=1e-4)
    for a, b in zip(one["layers"], two["layers"]):
        assert b["rel_error"] == pytest.approx(a["rel_error"], rel=1e-4)


def test_thresholds_table_and_outtype_guess(tiny):
    assert report.thresholds_for("Q4_K_S")["max_kld_mean"] == report.DEFAULT_THRESHOLDS["q4_k_m"]["max_kld_mean"]
    assert report.thresholds_for("mystery") == report.DEFAULT_THRESHOLDS[report.UNKNOWN_OUTTYPE_ROW]
    for outtype, row in [("IQ1_S", "q2_k"), ("iq2_m", "q3_k_m"), ("iq4_xs", "q4_k_m"), ("w8a16", "gptq-int8"),
                         ("bnb-int8", "q8_0"), ("fp8", "q5_k_m")]:
        assert report.thresholds_for(outtype) == report.DEFAULT_THRESHOLDS[row], outtype
    assert {m for m in MIXES if m.startswith("iq")} <= set(report.BORROWED_ROWS)  # every i-quant mix has a row
    assert report.thresholds_for("q8_0", {"max_kld_mean": 1.0})["max_kld_mean"] == 1.0
    with pytest.raises(ValueError, match="unknown threshold"):
        report.thresholds_for("q8_0", {"max_kdl": 1})
    assert report.guess_outtype(tiny) == "f32"
    tiny.info["file_type"] = 15
    try:
        assert report.guess_outtype(tiny) == "q4_k_m"
    finally:
        del tiny.info["file_type"]
    rep = {"ppl": 5.0, "ppl_ratio": 1.02, "kld_mean": 0.01, "same_top_p": 0.95, "first_divergent_layer": None}
    assert report.check(rep, report.thresholds_for("q8_0")) == ["max_ppl_ratio", "max_kld_mean", "min_same_top_p"]
    assert report.check(rep, report.thresholds_for("q4_k_m")) == []


def test_first_divergent_rule_uses_local_errors_and_routing():
    def row(i, attn=0.01, moe=0.02, route=0.0, rel=0.5):
        return {"layer": i, "attn_error": attn, "moe_error": moe, "local_routing_disagreement": route,
                "rel_error": rel}
    # a large accumulated (free-running) error alone flags nothing
    assert lockstep.first_divergent_layer([row(0), row(1, rel=0.9)], 0.05, 0.1) == (None, None)
    assert lockstep.first_divergent_layer([row(0), row(1, route=0.3), row(2, attn=1)], 0.05, 0.1) == (1, "routing")
    assert lockstep.first_divergent_layer([row(0), row(1, moe=0.06)], 0.05, 0.1) == (1, "moe")
