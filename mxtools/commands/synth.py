"""Random-weight Mixtral checkpoints for pipeline tests and benchmarks (deterministic per seed and name)."""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from ..core import names
from ..core.spec import PRESETS, ModelSpec
from ..core.tensors import Checkpoint, LazyTensor
from ..core.tokenizer import Tokenizer


def synth_spec(preset: str = "tiny", **overrides) -> ModelSpec:
    base = dict(PRESETS[preset])
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelSpec(**base, name=f"synth-{preset}")


def _init(name: str, shape: tuple, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Norms near 1, embeddings of unit scale, Linear weights scaled by 1/sqrt(fan-in) (router a bit sharper)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    kind = names.parse(name)[0]
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    w = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind.key == "token_embd":
        return w.to(dtype)
    scale = (3.0 if kind.key == "ffn_gate_inp" else 1.0) / shape[-1] ** 0.5
    return w.mul_(scale).to(dtype)


def synth_checkpoint(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Checkpoint:
    tensors = {}
    for n in names.canonical_names(spec):
        shape = names.expected_shape(n, spec)
        tensors[n] = LazyTensor(n, shape, dtype, lambda n=n, s=shape: _init(n, s, seed, dtype), "synth")
    return Checkpoint(spec, tensors, "synth", Path("synth"), Tokenizer.default())
