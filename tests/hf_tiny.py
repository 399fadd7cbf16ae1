"""A tiny random transformers MixtralForCausalLM and the mxtools Checkpoint holding the same weights.

transformers 5.x fuses the experts in memory (mlp.experts.gate_up_proj [E, 2F, D] = cat(w1, w3) per expert,
mlp.experts.down_proj [E, D, F] = w2, router mlp.gate.weight); `checkpoint_from_hf` maps them back to the
classic canonical per-expert names. Older transformers (classic names in the state_dict) pass straight through.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mxtools.core import names
from mxtools.core.spec import ModelSpec
from mxtools.core.tensors import Checkpoint, LazyTensor


def tiny_hf_model(n_layers=2, n_experts=8, seed=0, init=0.1, vocab=300):
    """A random fp32 Mixtral: hidden 64, 4 heads, 2 KV heads, top-2.

    `init` (std of the weights) is larger than transformers' 0.02 so attention is peaked and routing is
    decisive: a wrong k_proj or a swapped expert then changes the output clearly.
    """
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=n_experts, num_experts_per_tok=2,
                        vocab_size=vocab, initializer_range=init, max_position_embeddings=512,
                        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return MixtralForCausalLM(cfg).eval()


def spec_from_hf(cfg) -> ModelSpec:
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 1e6))
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelSpec(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                     n_kv_heads=cfg.num_key_value_heads, head_dim=hd, hidden_dim=cfg.intermediate_size,
                     n_experts=cfg.num_local_experts, n_experts_per_tok=cfg.num_experts_per_tok,
                     vocab_size=cfg.vocab_size, norm_eps=cfg.rms_norm_eps, rope_theta=theta)


def canonical_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under canonical (classic HF) names, experts split per expert."""
    out = {}
    F = model.config.intermediate_size
    for key, t in model.state_dict().items():
        t = t.detach().clone()
        prefix, _, rest = key.partition("mlp.")
        if not rest:
            out[key] = t
        elif rest == "gate.weight":
            out[prefix + "block_sparse_moe.gate.weight"] = t
        elif rest == "experts.gate_up_proj":
            for e in range(t.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = t[e, :F].clone()
                out[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = t[e, F:].clone()
        elif rest == "experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.w2.weight"] = t[e].clone()
        else:
            raise KeyError(f"unexpected transformers key {key}")
    return out


def checkpoint_from_state(spec: ModelSpec, state: dict[str, torch.Tensor], path="tiny") -> Checkpoint:
    """An in-memory Checkpoint whose LazyTensors return the given tensors."""
    tensors = {n: LazyTensor(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in state.items()}
    return Checkpoint(spec=spec, tensors=tensors, layout="memory", path=Path(path)).validate()


def checkpoint_from_hf(model) -> Checkpoint:
    return checkpoint_from_state(spec_from_hf(model.config), canonical_state(model))


def modified(ckpt: Checkpoint, changes: dict[str, torch.Tensor]) -> Checkpoint:
    """A copy of `ckpt` with some tensors replaced."""
    state = {n: t.load() for n, t in ckpt.tensors.items()}
    state.update(changes)
    return checkpoint_from_state(ckpt.spec, state, path=str(ckpt.path) + "-modified")


def expert_name(i, e, w="w1"):
    key = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}[w]
    return names.fill(names.KIND_BY_KEY[key].template, i, e)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: on a shared machine extra threads only spin (measured 0.07 s vs 13 s for one verify).
    Modules that import this fixture run on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
