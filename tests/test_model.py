"""The layer-streamed reference forward pass against transformers' MixtralForCausalLM."""
import pytest
import torch
from hf_tiny import (
    checkpoint_from_hf,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_hf_model,
)

from mxtools.core.errors import ShapeError, TensorSetError
from mxtools.model import forward


def _tokens(vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 40), generator=g)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(n_layers=3)


def test_logits_match_transformers_fp32(hf):
    ckpt = checkpoint_from_hf(hf)
    toks = _tokens()
    with torch.no_grad():
        want = hf(toks).logits.float()
    got = forward.logits(ckpt, toks, device="cpu")
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-5, rel
    assert want.std() > 0.1  # the comparison is not between near-zero outputs


def test_final_logprobs_are_log_softmax_of_logits(hf):
    ckpt = checkpoint_from_hf(hf)
    toks = _tokens(seed=2)
    h = forward.last_hidden(ckpt, toks, "cpu")
    lp = forward.final_logprobs(ckpt, h, slice(5, 9), "cpu")
    want = torch.log_softmax(forward.logits(ckpt, toks, "cpu")[:, 5:9], -1)
    assert lp.shape == (2, 4, 300)
    torch.testing.assert_close(lp, want)


def test_bf16_tracks_transformers_bf16():
    hf = tiny_hf_model(n_layers=3)
    ckpt = checkpoint_from_hf(hf)
    toks = _tokens()
    fp32 = forward.logits(ckpt, toks, "cpu", torch.float32)
    ours = forward.logits(ckpt, toks, "cpu", torch.bfloat16)
    with torch.no_grad():
        theirs = hf.to(torch.bfloat16)(toks).logits.float()
    assert ours.dtype == torch.float32
    # bf16 rounding (and the odd flipped expert) moves the logits; both implementations move alike
    assert (ours - theirs).norm() / theirs.norm() < 0.06
    assert 0 < (ours - fp32).norm() / fp32.norm() < 0.2


def _counting(ckpt, log):
    """Wrap every LazyTensor so loads are logged in order."""
    for name, t in ckpt.tensors.items():
        t.load = (lambda f=t.load, n=name: (log.append(n), f())[1])
    return ckpt


def test_layers_are_loaded_one_at_a_time_and_once(hf):
    log = []
    ckpt = _counting(checkpoint_from_hf(hf), log)
    gen = forward.iter_layers(ckpt, _tokens(), "cpu")
    i, h, top = next(gen)
    assert i == 0 and h.shape == (2, 40, 64) and top.shape == (80, 2)
    assert not any(n.startswith("model.layers.1.") for n in log)  # layer 1 not touched yet
    assert "lm_head.weight" not in log
    for _ in gen:
        pass
    assert sorted(log) == sorted(set(log))  # nothing loaded twice
    assert len(log) == len(ckpt.tensors) - 2  # all but the head (norm + lm_head)


def test_observer_sees_every_linear_input(hf):
    ckpt = checkpoint_from_hf(hf)
    seen = {}

    def observer(key, x, expert):
        seen.setdefault((key, expert), 0)
        seen[(key, expert)] += x.reshape(-1, x.shape[-1]).shape[0]

    for _ in forward.iter_layers(ckpt, _tokens(), "cpu", observer=observer):
        pass
    n_tok, layers = 80, 3
    assert seen[("attn_q", None)] == seen[("attn_output", None)] == seen[("ffn_gate_inp", None)] == n_tok * layers
    per_expert = [seen.get(("ffn_gate", e), 0) for e in range(8)]
    assert sum(per_expert) == n_tok * 2 * layers  # top-2: every token reaches two experts per layer
    assert all(seen.get(("ffn_down", e), 0) == c for e, c in enumerate(per_expert))


def test_missing_weight_and_bad_tokens_raise(hf):
    ckpt = checkpoint_from_hf(hf)
    with pytest.raises(ShapeError, match="token ids"):
        forward.logits(ckpt, [[0, 1, 300]], "cpu")
    del ckpt.tensors["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(TensorSetError, match="v_proj"):
        forward.logits(ckpt, [[0, 1, 2]], "cpu")
