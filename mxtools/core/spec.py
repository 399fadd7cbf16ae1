"""The model's hyperparameters, independent of any file layout.

Each layout module translates its own config spelling (config.json, params.json, GGUF metadata) to and from
this one dataclass; nothing else reads config files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import NotMixtralError, ShapeError
from .values import is_kind, positive_int, positive_real, show

DEFAULT_ROPE_THETA = 1e6  # Mixtral's; params.json omits it (docs/FORMATS.md, section 2)


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # one expert's FFN width (HF intermediate_size)
    n_experts: int
    n_experts_per_tok: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    context_length: int = 32768
    name: str = "mixtral"

    def __post_init__(self):
        """Every count is an int in 1..MAX_DIM and every real finite and positive (a float where a count belongs,
        a string, a bool or a null is refused), and the counts agree with each other."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                object.__setattr__(self, f.name, positive_int(value, f"config value {f.name}"))
            elif f.type == "float":
                object.__setattr__(self, f.name, positive_real(value, f"config value {f.name}"))
            elif not is_kind(value, str):
                raise ShapeError(f"config value {f.name} must be a string, not {show(value)}")
        if self.n_heads % self.n_kv_heads:
            raise ShapeError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts_per_tok > self.n_experts:
            raise ShapeError(f"experts per token {self.n_experts_per_tok} > experts {self.n_experts}")
        if self.head_dim % 2:
            raise ShapeError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def require_moe(n_experts, source) -> None:
    """Mixtral is defined by its sparse MoE blocks: refuse dense or other models early."""
    if not n_experts:
        raise NotMixtralError("not a Mixtral model: no mixture-of-experts settings in the config", file=source)


def spec_of(source, **fields) -> ModelSpec:
    """ModelSpec(**fields) read from the file `source`: a value out of range or a disagreement between the values
    (heads, experts) names the file."""
    try:
        return ModelSpec(**fields)
    except ShapeError as exc:
        raise ShapeError(exc.message, file=source) from None


# Presets for `mxtools synth`: real Mixtral-8x7B dimensions, and a tiny one for tests.
PRESETS = {
    "8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, n_experts=8,
                 n_experts_per_tok=2, vocab_size=32000),
    "tiny": dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, n_experts=8,
                 n_experts_per_tok=2, vocab_size=32000),
}
