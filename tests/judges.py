"""The independent judges: transformers' MixtralForCausalLM for HF checkpoints, llama.cpp for GGUF files."""
from __future__ import annotations

import numpy as np
import torch


def hf_logits(path, tokens: list[int]) -> torch.Tensor:
    """fp32 logits [T, V] from transformers on an HF-layout directory."""
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def llama_cpp_model(path, n_ctx: int = 256):
    """llama.cpp with an f32 KV cache: its default f16 cache flips near-tied router choices."""
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=2,
                 n_batch=n_ctx, verbose=False)


def llama_cpp_logits(path, tokens: list[int]) -> torch.Tensor:
    llm = llama_cpp_model(path)
    llm.eval(tokens)
    out = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    llm.close()
    return out


def kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) from logits."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)
