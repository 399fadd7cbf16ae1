"""Lazy tensor handles and the checkpoint object every reader returns and every writer consumes."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from . import names
from .errors import NonFiniteError, ShapeError, TensorSetError
from .spec import ModelSpec


def dense_nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of `shape` and `dtype` (GGML types: io.gguf_format.tensor_nbytes)."""
    return math.prod(shape) * dtype.itemsize


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


# 16-bit floats as raw bits: a value is NaN or infinite exactly when all its exponent bits are set
_EXPONENT_BITS = {torch.bfloat16: np.uint16(0x7F80), torch.float16: np.uint16(0x7C00)}


def first_non_finite(w: torch.Tensor, chunk: int = 1 << 22) -> int | None:
    """Flat index of w's first NaN or infinite value, or None. Scanned in chunks with numpy (several times
    faster than torch.isfinite here), so the scan needs little memory beyond w itself."""
    flat = w.detach().reshape(-1)
    if not flat.dtype.is_floating_point:
        return None
    if flat.device.type != "cpu" or flat.dtype not in (*_EXPONENT_BITS, torch.float32, torch.float64):
        bad = ~torch.isfinite(flat)
        return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
    mask = _EXPONENT_BITS.get(flat.dtype)
    a = flat.view(torch.int16).numpy().view(np.uint16) if mask is not None else flat.numpy()
    for s in range(0, a.size, chunk):
        part = a[s:s + chunk]
        bad = (part & mask) == mask if mask is not None else ~np.isfinite(part)
        if bad.any():
            return s + int(np.flatnonzero(bad)[0])
    return None


def require_finite(w: torch.Tensor, t: LazyTensor, output: str) -> None:
    """Refuse (naming t's file and tensor) a loaded weight with NaN or inf values for `output`, which cannot
    represent them."""
    i = first_non_finite(w)
    if i is not None:
        n = w.shape[-1] if w.dim() else 1
        raise NonFiniteError(f"holds {float(w.reshape(-1)[i])} at row {i // n}, column {i % n}; {output} cannot "
                             "represent NaN or infinite weights", t.source, t.name)


FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _few(items: list[str], total: int, k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" ... ({total - k} more)" if total > k else "")


@dataclass
class Checkpoint:
    """A Mixtral in canonical naming and orientation: the one thing readers produce and writers consume."""

    spec: ModelSpec
    tensors: dict[str, LazyTensor]
    layout: str
    path: Path
    tokenizer: object | None = None  # mxtools.core.tokenizer.Tokenizer
    info: dict = field(default_factory=dict)  # layout-specific extras (e.g. GGUF file type, GPTQ config)
    closers: list = field(default_factory=list)

    def ordered(self) -> list[LazyTensor]:
        return [self.tensors[n] for n in names.canonical_names(self.spec)]

    def main_dtype(self) -> torch.dtype:
        """The dtype of the bulk of the weights (used when the user asks for the source's own type)."""
        t = self.tensors[names.weight_name("ffn_gate", 0, 0)]
        return t.dtype

    def problems(self) -> list[Exception]:
        """Everything wrong with the tensor set against the spec: missing, unexpected, misshapen tensors. Costs
        time in the tensors present, not in the counts the config claims (which may be absurd)."""
        present = [n for n in self.tensors if names.in_spec(n, self.spec)]
        n_missing = names.tensor_count(self.spec) - len(present)
        extra = sorted(set(self.tensors) - set(present))
        out = []
        if n_missing:
            missing = list(islice((n for n in names.iter_canonical_names(self.spec) if n not in self.tensors), 5))
            out.append(TensorSetError(f"missing {n_missing} tensor(s): {_few(missing, n_missing)}", self.path,
                                      missing[0]))
        if extra:
            out.append(TensorSetError(f"unexpected {len(extra)} tensor(s): {_few(extra, len(extra))}",
                                      self.tensors[extra[0]].source or self.path, extra[0]))
        for n in present:
            t = self.tensors[n]
            exp = names.expected_shape(n, self.spec)
            if tuple(t.shape) != exp:
                out.append(ShapeError(f"shape {list(t.shape)} does not match the config's {list(exp)}",
                                      t.source, n))
            elif not t.dtype.is_floating_point:
                out.append(ShapeError(f"dtype {str(t.dtype).removeprefix('torch.')} is no float type", t.source, n))
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
