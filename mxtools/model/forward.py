"""The reference Mixtral forward pass in plain torch, streamed one layer at a time.

The math is transformers' `MixtralForCausalLM` (RMSNorm, rotate_half rotary, GQA causal attention without
sliding window, fp32 router softmax, top-k with renormalised weights, experts `w2(silu(w1 x) * w3 x)`), but the
weights are never all resident: each layer is loaded from the Checkpoint, every token of the batch passes
through it, and it is dropped before the next one. Peak memory is one layer plus the activations.

Pieces, smallest first, so a quantizer or a lockstep comparison can reuse them:
  load_weight          the ONE place weights are fetched (a GPTQ reader plugs in here, see its docstring)
  load_layer           one layer's weights as a LayerWeights
  attention / moe      a sublayer's update for already-normalised inputs; moe also returns the routing
  attn_block / moe_block / layer_forward   residual steps
  iter_layers          generator: (layer index, hidden state after it, top-k expert ids)
  iter_logprobs / final_logprobs / logits  the output head, a sequence at a time
Calibration observers: pass `observer(kind_key, x, expert)` and it sees the input of every Linear (see
`layer_forward`), with each expert's input restricted to the tokens routed to it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import names
from ..core.errors import ShapeError, TensorSetError
from ..core.spec import ModelSpec
from ..core.tensors import Checkpoint

# Work is cut into pieces so activations stay bounded at 8x7B scale (32000-wide logits, 14336-wide experts).
TOKENS_PER_STEP = 4096  # rows per expert matmul piece
SEQS_PER_ATTENTION = 8  # sequences per attention call ([seqs, heads, T, T] scores on CPU)

Observer = Callable[[str, torch.Tensor, int | None], None]


def resolve_device(device="auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_weight(ckpt: Checkpoint, name: str, device, dtype: torch.dtype) -> torch.Tensor:
    """Fetch one weight (canonical HF name, HF orientation) onto `device` as `dtype`.

    Every weight the forward pass uses comes through here. A quantized checkpoint (GPTQ, GGUF block
    quants) takes part by exposing LazyTensors whose `load()` returns the dequantized weight; nothing in
    this module needs to know the storage format.
    """
    lazy = ckpt.tensors.get(name)
    if lazy is None:
        raise TensorSetError("the forward pass needs this tensor but the checkpoint lacks it",
                             file=ckpt.path, tensor=name)
    return lazy.load().to(device=device, dtype=dtype)


@dataclass
class LayerWeights:
    """One decoder layer's weights; experts[e] = (w1, w2, w3)."""

    attn_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    ffn_norm: torch.Tensor
    router: torch.Tensor
    experts: list


def load_layer(ckpt: Checkpoint, i: int, device, dtype) -> LayerWeights:
    """Load layer `i` through `load_weight`."""
    def get(key, e=None):
        return load_weight(ckpt, names.weight_name(key, i, e), device, dtype)

    experts = [(get("ffn_gate", e), get("ffn_down", e), get("ffn_up", e)) for e in range(ckpt.spec.n_experts)]
    return LayerWeights(get("attn_norm"), get("attn_q"), get("attn_k"), get("attn_v"), get("attn_output"),
                        get("ffn_norm"), get("ffn_gate_inp"), experts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(spec: ModelSpec, n_pos: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n_pos, head_dim] for positions 0..n_pos-1 (fp32 angles, then cast, as transformers)."""
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))
    freqs = torch.arange(n_pos, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(x: torch.Tensor, w: LayerWeights, spec: ModelSpec, rope, observer: Observer | None = None):
    """Causal GQA self-attention update for normalised input x [B, T, D] (no residual)."""
    if observer:
        observer("attn_q", x, None)  # also the input of k_proj and v_proj
    pieces = [attention_heads(x[s:s + SEQS_PER_ATTENTION], w, spec, rope)
              for s in range(0, x.shape[0], SEQS_PER_ATTENTION)]
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if observer:
        observer("attn_output", out, None)
    return F.linear(out, w.o)


def attention_heads(x, w: LayerWeights, spec: ModelSpec, rope) -> torch.Tensor:
    """Attention output before o_proj, [B, T, H*hd]."""
    B, T, _ = x.shape
    hd, H, Hkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    q = F.linear(x, w.q).view(B, T, H, hd).transpose(1, 2)
    k = F.linear(x, w.k).view(B, T, Hkv, hd).transpose(1, 2)
    v = F.linear(x, w.v).view(B, T, Hkv, hd).transpose(1, 2)
    cos, sin = rope[0][:T], rope[1][:T]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    # KV head j serves query heads j*rep .. (j+1)*rep-1 (transformers' repeat_kv)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(B, T, H * hd)


def route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router for tokens x [N, D]: fp32 softmax over experts, top-k, weights renormalised to sum 1.

    Returns (weights fp32 [N, k], expert ids [N, k], ordered by decreasing probability).
    """
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    top_w, top_i = torch.topk(probs, k, dim=-1)
    return top_w / top_w.sum(dim=-1, keepdim=True), top_i


def routed_tokens(top_i: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token rows, top-k slot) of the tokens routed to `expert`: the calibration set of that expert."""
    return torch.where(top_i == expert)


def expert_forward(x, w1, w2, w3, expert: int | None = None, observer: Observer | None = None) -> torch.Tensor:
    """One expert, w2(silu(w1 x) * w3 x)."""
    if observer:
        observer("ffn_gate", x, expert)  # also the input of w3 (ffn_up)
    h = F.silu(F.linear(x, w1)) * F.linear(x, w3)
    if observer:
        observer("ffn_down", h, expert)
    return F.linear(h, w2)


def moe(x: torch.Tensor, w: LayerWeights, spec: ModelSpec, observer: Observer | None = None):
    """Sparse MoE update for normalised input x [..., D]: returns (update like x, expert ids [N, k])."""
    flat = x.reshape(-1, x.shape[-1])
    if observer:
        observer("ffn_gate_inp", flat, None)
    top_w, top_i = route(flat, w.router, spec.n_experts_per_tok)
    out = torch.zeros_like(flat)
    for e, (w1, w2, w3) in enumerate(w.experts):
        rows, slot = routed_tokens(top_i, e)
        for s in range(0, rows.numel(), TOKENS_PER_STEP):
            r, sl = rows[s:s + TOKENS_PER_STEP], slot[s:s + TOKENS_PER_STEP]
            y = expert_forward(flat[r], w1, w2, w3, e, observer) * top_w[r, sl, None]
            out.index_add_(0, r, y.to(out.dtype))  # the routing weight product is fp32, as transformers
    return out.view_as(x), top_i


def attn_block(h, w: LayerWeights, spec: ModelSpec, rope, observer: Observer | None = None) -> torch.Tensor:
    """The attention sublayer's update (without the residual) for hidden state h."""
    return attention(rms_norm(h, w.attn_norm, spec.norm_eps), w, spec, rope, observer)


def moe_block(h, w: LayerWeights, spec: ModelSpec, observer: Observer | None = None):
    """The MoE sublayer's update (without the residual) for hidden state h, and the expert ids."""
    return moe(rms_norm(h, w.ffn_norm, spec.norm_eps), w, spec, observer)


def layer_forward(h, w: LayerWeights, spec: ModelSpec, rope, observer: Observer | None = None):
    """One decoder layer: returns (hidden state after it, top-k expert ids [B*T, k]).

    `observer(kind_key, x, expert)` sees every Linear's input: "attn_q" (q, k and v share it), "attn_output",
    "ffn_gate_inp" (router, all tokens), "ffn_gate" (w1 and w3 of `expert`, its routed tokens), "ffn_down".
    """
    h = h + attn_block(h, w, spec, rope, observer)
    update, top_i = moe_block(h, w, spec, observer)
    return h + update, top_i


def as_tokens(tokens, spec: ModelSpec, device) -> torch.Tensor:
    """A [B, T] int64 tensor from a tensor or (nested) list; ids must be inside the vocabulary."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    t = t[None] if t.dim() == 1 else t
    if t.dim() != 2 or t.numel() == 0:
        raise ShapeError(f"tokens must be a non-empty [batch, positions] array, got shape {list(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= spec.vocab_size:
        raise ShapeError(f"token ids must lie in [0, {spec.vocab_size}), got {int(t.min())}..{int(t.max())}")
    return t.to(device)


def embed(ckpt: Checkpoint, tokens: torch.Tensor, device, dtype) -> torch.Tensor:
    """Token embeddings [B, T, D]; the table is loaded for this call only."""
    table = load_weight(ckpt, names.weight_name("token_embd"), device, dtype)
    return F.embedding(tokens, table)


def iter_layers(ckpt: Checkpoint, tokens, device="auto", dtype=torch.float32,
                observer: Observer | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Run the decoder stack layer by layer, yielding (layer index, hidden [B, T, D], expert ids [B*T, k]).

    Each layer's weights are loaded just before it runs and released before the yield, so two of these
    generators can be advanced side by side (lockstep) holding one layer each.
    """
    dev = resolve_device(device)
    toks = as_tokens(tokens, ckpt.spec, dev)
    h = embed(ckpt, toks, dev, dtype)
    rope = rope_tables(ckpt.spec, toks.shape[1], dev, dtype)
    for i in range(ckpt.spec.n_layers):
        w = load_layer(ckpt, i, dev, dtype)
        h, top_i = layer_forward(h, w, ckpt.spec, rope, observer)
        del w
        yield i, h, top_i


def load_head(ckpt: Checkpoint, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight, lm_head weight)."""
    return (load_weight(ckpt, names.weight_name("output_norm"), device, dtype),
            load_weight(ckpt, names.weight_name("output"), device, dtype))


def head_logits(h: torch.Tensor, head, spec: ModelSpec) -> torch.Tensor:
    """fp32 logits for hidden states h [..., D] given `load_head`'s weights."""
    norm, lm_head = head
    return F.linear(rms_norm(h, norm, spec.norm_eps), lm_head).float()


def iter_logprobs(ckpt: Checkpoint, h: torch.Tensor, positions=slice(None), device="auto",
                  dtype=torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (sequence index, fp32 log-probs [P, V]) for h[b, positions], one sequence at a time.

    The output head is loaded once for the whole generator; only one sequence's [P, V] block exists at a time.
    """
    head = load_head(ckpt, resolve_device(device), dtype)
    for b in range(h.shape[0]):
        yield b, torch.log_softmax(head_logits(h[b, positions], head, ckpt.spec), dim=-1)


def final_logprobs(ckpt: Checkpoint, h: torch.Tensor, positions=slice(None), device="auto",
                   dtype=torch.float32) -> torch.Tensor:
    """All of `iter_logprobs` stacked: fp32 log-probs [B, P, V] (small inputs only)."""
    return torch.stack([lp for _, lp in iter_logprobs(ckpt, h, positions, device, dtype)])


def last_hidden(ckpt: Checkpoint, tokens, device="auto", dtype=torch.float32) -> torch.Tensor:
    """Hidden state after the last layer, [B, T, D]."""
    h = None
    for _, h, _ in iter_layers(ckpt, tokens, device, dtype):
        pass
    return h


def logits(ckpt: Checkpoint, tokens, device="auto", dtype=torch.float32) -> torch.Tensor:
    """fp32 logits [B, T, V] for `tokens` [B, T] (or [T]); convenience for small inputs and tests."""
    h = last_hidden(ckpt, tokens, device, dtype)
    head = load_head(ckpt, h.device, dtype)
    return torch.stack([head_logits(h[b], head, ckpt.spec) for b in range(h.shape[0])])
