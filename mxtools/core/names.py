"""Canonical tensor kinds and the name-table machinery every layout uses.

Every checkpoint is handled in one canonical naming, the Hugging Face one (`model.layers.{i}...`), with
weights in HF orientation ([out, in], q/k rows in rotate_half order). A layout module declares one
`NameTable`: canonical template -> its own template. Placeholders are `{i}` (layer) and `{e}` (expert);
a canonical `{e}` missing from the layout side means the layout stacks experts on the outermost axis.
The reverse direction is derived from the same table.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .spec import ModelSpec


@dataclass(frozen=True)
class Kind:
    """One tensor kind and every per-kind policy: the writers, mixes and quantizers read these flags and
    decide nothing about kinds themselves."""

    key: str          # short name used by quant policies and recipes (llama.cpp's tensor kind)
    template: str     # canonical (HF) name template
    shape: Callable[[ModelSpec], tuple]
    linear: bool      # a Linear weight [out, in] (router and lm_head included); else embedding or norm
    gptq: bool = False      # GPTQ/RTN int quantization takes it (attention and expert Linears only)
    imatrix: bool = False   # llama-imatrix collects its input statistics (every Linear inside the layers)
    gguf_f32: bool = False  # llama.cpp never block-quantizes it (tensor_allows_quantization): F32 in every GGUF

    @property
    def scope(self) -> str:
        return "expert" if "{e}" in self.template else "layer" if "{i}" in self.template else "global"


_L = "model.layers.{i}."
_X = _L + "block_sparse_moe.experts.{e}."
_LIN = dict(linear=True, gptq=True, imatrix=True)  # a Linear inside a layer that every quantizer takes
_NORM = dict(linear=False, gguf_f32=True)
KINDS = [
    Kind("token_embd", "model.embed_tokens.weight", lambda s: (s.vocab_size, s.dim), linear=False),
    Kind("attn_norm", _L + "input_layernorm.weight", lambda s: (s.dim,), **_NORM),
    Kind("attn_q", _L + "self_attn.q_proj.weight", lambda s: (s.n_heads * s.head_dim, s.dim), **_LIN),
    Kind("attn_k", _L + "self_attn.k_proj.weight", lambda s: (s.n_kv_heads * s.head_dim, s.dim), **_LIN),
    Kind("attn_v", _L + "self_attn.v_proj.weight", lambda s: (s.n_kv_heads * s.head_dim, s.dim), **_LIN),
    Kind("attn_output", _L + "self_attn.o_proj.weight", lambda s: (s.dim, s.n_heads * s.head_dim), **_LIN),
    Kind("ffn_norm", _L + "post_attention_layernorm.weight", lambda s: (s.dim,), **_NORM),
    # the router: a Linear that llama.cpp keeps F32 and GPTQ keeps float (vLLM runs it unquantized)
    Kind("ffn_gate_inp", _L + "block_sparse_moe.gate.weight", lambda s: (s.n_experts, s.dim), linear=True,
         imatrix=True, gguf_f32=True),
    Kind("ffn_gate", _X + "w1.weight", lambda s: (s.hidden_dim, s.dim), **_LIN),
    Kind("ffn_down", _X + "w2.weight", lambda s: (s.dim, s.hidden_dim), **_LIN),
    Kind("ffn_up", _X + "w3.weight", lambda s: (s.hidden_dim, s.dim), **_LIN),
    Kind("output_norm", "model.norm.weight", lambda s: (s.dim,), **_NORM),
    Kind("output", "lm_head.weight", lambda s: (s.vocab_size, s.dim), linear=True),
]
KIND_BY_KEY = {k.key: k for k in KINDS}


GPTQ_KINDS = tuple(k.key for k in KINDS if k.gptq)
_GGUF_F32_KINDS = frozenset(k.key for k in KINDS if k.gguf_f32)


def gguf_f32(kind_key: str, np_shape) -> bool:
    """Whether llama.cpp keeps this tensor F32 in every GGUF, whatever the type asked: the norms and the router
    (Kind.gguf_f32) and any 1-D tensor."""
    return len(np_shape) < 2 or kind_key in _GGUF_F32_KINDS


def is_gptq_quantized(name: str) -> bool:
    """Whether the canonical weight `name` is one GPTQ (or RTN int) quantizes."""
    parsed = parse(name)
    return parsed is not None and parsed[0].gptq


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern + "$")


_KIND_RX = [(k, _regex(k.template)) for k in KINDS]


def parse(name: str):
    """Canonical name -> (Kind, layer or None, expert or None); None if it is no Mixtral tensor."""
    for kind, rx in _KIND_RX:
        m = rx.match(name)
        if m:
            d = m.groupdict()
            return kind, _int(d.get("i")), _int(d.get("e"))
    return None


def _int(x):
    return None if x is None else int(x)


def fill(template: str, i=None, e=None) -> str:
    return template.replace("{i}", str(i)).replace("{e}", str(e))


def weight_name(key: str, i: int | None = None, e: int | None = None) -> str:
    """The canonical name of the tensor of kind `key` in layer i (expert e); the one place names are built."""
    return fill(KIND_BY_KEY[key].template, i, e)


def iter_canonical_names(spec: ModelSpec) -> Iterator[str]:
    """Every tensor a Mixtral of this spec has, in the order HF and GGUF writers emit them."""
    yield KIND_BY_KEY["token_embd"].template
    for i in range(spec.n_layers):
        for kind in KINDS:
            if kind.scope == "layer":
                yield fill(kind.template, i)
            elif kind.scope == "expert":
                yield from (fill(kind.template, i, e) for e in range(spec.n_experts))
    yield from (KIND_BY_KEY["output_norm"].template, KIND_BY_KEY["output"].template)


def canonical_names(spec: ModelSpec) -> list[str]:
    return list(iter_canonical_names(spec))


def tensor_count(spec: ModelSpec) -> int:
    """len(canonical_names(spec)), without listing them (a config may claim absurd counts)."""
    per = {scope: sum(k.scope == scope for k in KINDS) for scope in ("global", "layer", "expert")}
    return per["global"] + spec.n_layers * (per["layer"] + per["expert"] * spec.n_experts)


def in_spec(name: str, spec: ModelSpec) -> bool:
    """Whether `name` is one of canonical_names(spec)."""
    hit = parse(name)
    if hit is None:
        return False
    kind, i, e = hit
    in_range = (i is None or i < spec.n_layers) and (e is None or e < spec.n_experts)
    return in_range and fill(kind.template, i, e) == name  # "layers.01" is not "layers.1"


def expected_shape(name: str, spec: ModelSpec) -> tuple:
    kind, _, _ = parse(name)
    return tuple(kind.shape(spec))


class NameTable:
    """A layout's declarative name table: kind key -> that layout's template (None: not stored)."""

    def __init__(self, rows: dict[str, str | None]):
        unknown = set(rows) - set(KIND_BY_KEY)
        if unknown:
            raise ValueError(f"unknown tensor kinds in name table: {sorted(unknown)}")
        self.rows = rows
        self._rx = [(KIND_BY_KEY[k], t, _regex(t)) for k, t in rows.items() if t]

    def to_layout(self, name: str) -> tuple[str, int | None]:
        """Canonical name -> (layout name, expert slice index or None when the layout keeps experts apart)."""
        kind, i, e = parse(name)
        template = self.rows[kind.key]
        stacked = "{e}" in kind.template and "{e}" not in template
        return fill(template, i, e), (e if stacked else None)

    def to_canonical(self, layout_name: str) -> tuple[str, bool] | None:
        """Layout name -> (canonical name or template with {e} left when stacked, stacked?)."""
        for kind, template, rx in self._rx:
            m = rx.match(layout_name)
            if m:
                d = m.groupdict()
                stacked = "{e}" in kind.template and "{e}" not in template
                return fill(kind.template, d.get("i"), "{e}" if stacked else d.get("e")), stacked
        return None


# The canonical naming as a table (transformers' MixtralForCausalLM state dict names): the HF layout's own.
CANONICAL_TABLE = NameTable({k.key: k.template for k in KINDS})
