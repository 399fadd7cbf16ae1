"""Lazy tensor handles and the checkpoint object every reader returns and every writer consumes."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import names
from .errors import MissingTensorError, ShapeError
from .spec import ModelSpec


@dataclass
class LazyTensor:
    """A tensor not yet read: its canonical name, shape, the dtype `load()` returns, and where it lives."""

    name: str
    shape: tuple
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    source: str = ""
    stored_as: str = ""  # the type on disk when it differs from `dtype` (e.g. a GGUF block quant "Q4_K")

    def renamed(self, name: str) -> LazyTensor:
        return dataclasses.replace(self, name=name)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], name=None, shape=None) -> LazyTensor:
        """A lazy tensor that applies `fn` to this one when loaded."""
        load = self.load
        return LazyTensor(name or self.name, tuple(shape or self.shape), self.dtype, lambda: fn(load()),
                          self.source, self.stored_as)


FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _few(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" ... ({len(items) - k} more)" if len(items) > k else "")


@dataclass
class Checkpoint:
    """A Mixtral in canonical naming and orientation: the one thing readers produce and writers consume."""

    spec: ModelSpec
    tensors: dict[str, LazyTensor]
    layout: str
    path: Path
    tokenizer: object | None = None  # mxtools.tokenizer.Tokenizer
    info: dict = field(default_factory=dict)  # layout-specific extras (e.g. GGUF file type, GPTQ config)
    closers: list = field(default_factory=list)

    def ordered(self) -> list[LazyTensor]:
        return [self.tensors[n] for n in names.canonical_names(self.spec)]

    def main_dtype(self) -> torch.dtype:
        """The dtype of the bulk of the weights (used when the user asks for the source's own type)."""
        t = self.tensors[names.fill(names.KIND_BY_KEY["ffn_gate"].template, 0, 0)]
        return t.dtype

    def problems(self) -> list[Exception]:
        """Everything wrong with the tensor set against the spec: missing, unexpected, misshapen tensors."""
        want = names.canonical_names(self.spec)
        missing = [n for n in want if n not in self.tensors]
        extra = sorted(set(self.tensors) - set(want))
        out = []
        if missing:
            out.append(MissingTensorError(f"missing {len(missing)} tensor(s): {_few(missing)}", self.path,
                                          missing[0]))
        if extra:
            out.append(MissingTensorError(f"unexpected {len(extra)} tensor(s): {_few(extra)}",
                                          self.tensors[extra[0]].source or self.path, extra[0]))
        for n in want:
            t = self.tensors.get(n)
            exp = names.expected_shape(n, self.spec)
            if t is not None and tuple(t.shape) != exp:
                out.append(ShapeError(f"shape {list(t.shape)} does not match the config's {list(exp)}",
                                      t.source, n))
        return out

    def validate(self) -> Checkpoint:
        """Raise the first problem found (each names the file and tensor)."""
        problems = self.problems()
        if problems:
            raise problems[0]
        return self

    def close(self):
        for c in self.closers:
            c()
        self.closers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
