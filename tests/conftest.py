"""Shared fixtures: small synthetic Mixtrals written through the project's own writers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mxtools.convert import write_checkpoint
from mxtools.synth import synth_checkpoint, synth_spec

torch.set_num_threads(min(2, os.cpu_count() or 1))


def small_spec(**kw):
    """A Mixtral small enough for every test (real 32000-piece vocabulary)."""
    base = dict(n_layers=2, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                n_experts_per_tok=2)
    base.update(kw)
    return synth_spec("tiny", **base)


def write_synth(out: Path, layout: str, dtype: str = "f32", spec=None, seed: int = 0) -> Path:
    from mxtools.tensors import FLOAT_DTYPES
    ckpt = synth_checkpoint(spec or small_spec(), seed, FLOAT_DTYPES[dtype])
    return write_checkpoint(ckpt, layout, out, dtype)


def text_head(tmp_path_factory, source: Path, chars: int) -> Path:
    """The first `chars` characters of a bundled text, as a file (for tests that need less of it)."""
    path = tmp_path_factory.mktemp("text") / source.name
    path.write_text(source.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """Write a synth model once per session per (layout, dtype) and hand out its path."""
    root = tmp_path_factory.mktemp("synth")
    cache = {}

    def get(layout="hf", dtype="f32") -> Path:
        key = (layout, dtype)
        if key not in cache:
            name = f"{layout}-{dtype}" + (".gguf" if layout == "gguf" else "")
            cache[key] = write_synth(root / name, layout, dtype)
        return cache[key]
    return get
