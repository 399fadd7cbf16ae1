"""Weight transforms between layouts, as small functions in inverse pairs (each has a round-trip test)."""
from __future__ import annotations

import torch


def rope_heads(kind_key: str, spec) -> int | None:
    """How many heads a q/k weight (tensor kind `kind_key` of a ModelSpec) is permuted over between HF and Meta
    order; None for every other tensor."""
    return {"attn_q": spec.n_heads, "attn_k": spec.n_kv_heads}.get(kind_key)


def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half row order -> Meta/Mistral/GGUF interleaved pairs, for q or k (docs/FORMATS.md, section 4)."""
    out, inp = w.shape[0], w.shape[-1]
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, inp).transpose(1, 2).reshape(out, inp).contiguous()


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_to_meta_rope`."""
    out, inp = w.shape[0], w.shape[-1]
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp).contiguous()


def transpose(w: torch.Tensor) -> torch.Tensor:
    """[in, out] (Paddle Linear) <-> [out, in]; its own inverse."""
    return w.t().contiguous()
