"""Typed reads of the values parsed from files (JSON configs, YAML recipes, GGUF metadata): the one place that says
what a file's integer, number, string, boolean, count or object is, and the one "required" marker. A bool is no
number here (JSON `true` is no count), an integer is a number; every refusal names the file and the key.
"""
from __future__ import annotations

import math
import numbers

from .errors import FormatError, ShapeError

MAX_DIM = 2**31 - 1  # every count and width must fit llama.cpp's int32 (GGUF stores them as uint32)
REQUIRED = object()  # as a default: the key must be present (and, in a config, not null)
_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


def show(value, width: int = 40) -> str:
    """repr(value) cut to `width` characters, for an error message."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def is_kind(value, kind: type) -> bool:
    """`value` is a `kind` (int, float, str, bool, list or dict) as a file means it: a bool is neither an int nor a
    float, an int is a float."""
    if kind in (int, float):
        return not isinstance(value, bool) and isinstance(value, numbers.Integral if kind is int else numbers.Real)
    return isinstance(value, kind)


def positive_int(value, what: str) -> int:
    """`value` as an int from 1 to MAX_DIM; anything else (bool, float, string, null, list) is a ShapeError."""
    if not is_kind(value, int) or not 0 < value <= MAX_DIM:
        raise ShapeError(f"{what} must be an integer from 1 to {MAX_DIM}, not {show(value)}")
    return int(value)


def positive_real(value, what: str) -> float:
    """`value` as a finite float > 0; anything else is a ShapeError."""
    if not is_kind(value, float) or not math.isfinite(value) or value <= 0:
        raise ShapeError(f"{what} must be a finite number > 0, not {show(value)}")
    return float(value)


def json_object(obj, what: str, source) -> dict:
    """`obj` when it is a JSON object; a FormatError naming `source` otherwise."""
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object (got {type(obj).__name__})", file=source)
    return obj


class ConfigValues:
    """Typed reads of one parsed config file (config.json, params.json): each value is checked where it is read,
    and every error names the file and the key. A null counts as absent where the key has a default."""

    def __init__(self, obj, source, prefix: str = ""):
        self.obj = json_object(obj, f"config{' ' + prefix.rstrip('.') if prefix else ''}", source)
        self.source, self.prefix = source, prefix

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
        if default is REQUIRED:
            what = "is missing" if key not in self.obj else "is null"
            raise FormatError(f"config value {self.prefix}{key!r} {what}", file=self.source)
        return default

    def _checked(self, check, key, default):
        try:
            return check(self._get(key, default), f"config value {self.prefix}{key}")
        except ShapeError as exc:
            raise FormatError(exc.message, file=self.source) from None

    def count(self, key: str, default=REQUIRED) -> int:
        return self._checked(positive_int, key, default)

    def real(self, key: str, default=REQUIRED) -> float:
        return self._checked(positive_real, key, default)

    def text(self, key: str, default=REQUIRED) -> str:
        value = self._get(key, default)
        if not is_kind(value, str):
            raise FormatError(f"config value {self.prefix}{key} must be a string, not {show(value)}",
                              file=self.source)
        return value


def meta_value(m: dict, key: str, kind: type, source, default=REQUIRED):
    """GGUF metadata value `key` checked to be of `kind` (is_kind: int, float, str, bool or list); FormatError if
    it is missing (and no default is given) or of another type."""
    if key not in m:
        if default is REQUIRED:
            raise FormatError(f"GGUF metadata is missing {key!r}", file=source)
        return default
    v = m[key]
    if not is_kind(v, kind):
        raise FormatError(f"GGUF metadata {key} is {show(v, 60)}, not {_KIND_WORDS[kind]}", file=source)
    return v
