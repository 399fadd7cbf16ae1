"""The model's hyperparameters, independent of any file layout.

Each layout module translates its own config spelling (config.json, params.json, GGUF metadata) to and from
this one dataclass; nothing else reads config files.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .errors import FormatError, MxError, NotMixtralError, ShapeError

DEFAULT_ROPE_THETA = 1e6  # Mixtral's; params.json omits it (docs/FORMATS.md, section 2)
MAX_DIM = 2**31 - 1  # every count and width must fit llama.cpp's int32 (GGUF stores them as uint32)
_REQUIRED = object()


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def positive_int(value, what: str) -> int:
    """`value` as an int from 1 to MAX_DIM; anything else (bool, float, string, null, list) is a ShapeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= MAX_DIM:
        raise ShapeError(f"{what} must be an integer from 1 to {MAX_DIM}, not {_show(value)}")
    return int(value)


def positive_real(value, what: str) -> float:
    """`value` as a finite float > 0; anything else is a ShapeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ShapeError(f"{what} must be a finite number > 0, not {_show(value)}")
    return float(value)


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
            elif not isinstance(value, str):
                raise ShapeError(f"config value {f.name} must be a string, not {_show(value)}")
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


class ConfigValues:
    """Typed reads of one parsed config file (config.json, params.json): each value is checked where it is read,
    and every error names the file and the key. A null counts as absent where the key has a default."""

    def __init__(self, obj, source, prefix: str = ""):
        if not isinstance(obj, dict):
            raise FormatError(f"config{' ' + prefix.rstrip('.') if prefix else ''} is not a JSON object "
                              f"(got {type(obj).__name__})", file=source)
        self.obj, self.source, self.prefix = obj, source, prefix

    def section(self, key: str) -> ConfigValues:
        """A nested object (absent or null: an empty one)."""
        value = self.obj.get(key)
        return ConfigValues({} if value is None else value, self.source, f"{self.prefix}{key}.")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def _get(self, key: str, default):
        value = self.obj.get(key)
        if value is not None:
            return value
        if default is _REQUIRED:
            what = "is missing" if key not in self.obj else "is null"
            raise FormatError(f"config value {self.prefix}{key!r} {what}", file=self.source)
        return default

    def _checked(self, check, key, default):
        try:
            return check(self._get(key, default), f"config value {self.prefix}{key}")
        except ShapeError as exc:
            raise FormatError(exc.message, file=self.source) from None

    def count(self, key: str, default=_REQUIRED) -> int:
        return self._checked(positive_int, key, default)

    def real(self, key: str, default=_REQUIRED) -> float:
        return self._checked(positive_real, key, default)

    def text(self, key: str, default=_REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise FormatError(f"config value {self.prefix}{key} must be a string, not {_show(value)}",
                              file=self.source)
        return value

    def spec(self, **fields) -> ModelSpec:
        """ModelSpec(**fields); a disagreement between the values (heads, experts) names this file."""
        try:
            return ModelSpec(**fields)
        except MxError as exc:
            raise type(exc)(exc.message, file=self.source) from None


# Presets for `mxtools synth`: real Mixtral-8x7B dimensions, and a tiny one for tests.
PRESETS = {
    "8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, n_experts=8,
                 n_experts_per_tok=2, vocab_size=32000),
    "tiny": dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, n_experts=8,
                 n_experts_per_tok=2, vocab_size=32000),
}
