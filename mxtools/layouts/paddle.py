"""PaddleNLP layout (read only): HF names with the `mixtral.` prefix, Linear weights stored [in, out].

The weights are what PaddleNLP's `save_pretrained` writes: by default `model_state.pdparams` (a pickle, read by
`io.pdparams` without running any of it), sharded as `model_state-0000k-of-0000n.pdparams` with
`model_state.pdparams.index.json`; with `safe_serialization=True` safetensors shards (`model.safetensors`, or
`model_state.safetensors` in PaddleNLP's model mirrors)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..core import names
from ..core.names import NameTable
from ..core.transforms import transpose
from ..io.hf_dir import first_shard_keys, read_dir, shard_files
from ..io.pdparams import PdparamsFile
from ..io.safetensors import DTYPES, SafetensorsFile
from . import Layout, register

# PaddleNLP's Mixtral names (docs/FORMATS.md, section 3): HF's with `mixtral.` for `model.`; lm_head unchanged.
TABLE = NameTable({k.key: k.template.replace("model.", "mixtral.", 1) for k in names.KINDS})
PDPARAMS = "model_state.pdparams"
PDPARAMS_INDEX = "model_state.pdparams.index.json"
# PaddleNLP writes safetensors through numpy (`__metadata__` format "np"): bfloat16 as its bits, dtype "U16"
SAFETENSORS = partial(SafetensorsFile, dtypes={**DTYPES, "U16": torch.bfloat16})


def _to_hf(lazy):
    """Paddle Linear weights are the transpose of HF's; embeddings and norms are stored as HF does."""
    kind = names.parse(lazy.name)[0]
    if not kind.linear:
        return lazy
    return lazy.map(transpose, shape=tuple(reversed(lazy.shape)))


def _has_pdparams(path: Path) -> bool:
    """A PaddleNLP directory saved in Paddle's own format (and no safetensors beside it)."""
    return (path.is_dir() and (path / "config.json").exists() and not any(path.glob("*.safetensors"))
            and ((path / PDPARAMS).exists() or (path / PDPARAMS_INDEX).exists()))


def is_paddle(path: Path) -> bool:
    if _has_pdparams(path):
        return True
    keys = first_shard_keys(path, SAFETENSORS)
    return bool(keys) and any(k.startswith("mixtral.") for k in keys)


def read(path: Path):
    if not _has_pdparams(path):
        ckpt = read_dir(path, TABLE, "paddle", _to_hf, opener=SAFETENSORS)
        ckpt.info["weights"] = "safetensors"
        return ckpt
    files = shard_files(path, PDPARAMS_INDEX, ".pdparams") if (path / PDPARAMS_INDEX).exists() else [path / PDPARAMS]
    ckpt = read_dir(path, TABLE, "paddle", _to_hf, files, PdparamsFile)
    ckpt.info["weights"] = "pdparams"
    return ckpt


register(Layout("paddle", is_paddle, read))
