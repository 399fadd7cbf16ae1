"""PaddleNLP layout (read only): HF names with the `mixtral.` prefix, Linear weights stored [in, out]."""
from __future__ import annotations

from pathlib import Path

from ..core import names
from ..core.names import NameTable
from ..core.transforms import transpose
from ..io.hf_dir import first_shard_keys, read_dir
from . import Layout, register

# PaddleNLP's Mixtral names (docs/FORMATS.md, section 3): HF's with `mixtral.` for `model.`; lm_head unchanged.
TABLE = NameTable({k.key: k.template.replace("model.", "mixtral.", 1) for k in names.KINDS})


def _to_hf(lazy):
    """Paddle Linear weights are the transpose of HF's; embeddings and norms are stored as HF does."""
    kind = names.parse(lazy.name)[0]
    if not kind.linear:
        return lazy
    return lazy.map(transpose, shape=tuple(reversed(lazy.shape)))


def is_paddle(path: Path) -> bool:
    keys = first_shard_keys(path)
    return bool(keys) and any(k.startswith("mixtral.") for k in keys)


def read(path: Path):
    return read_dir(path, TABLE, "paddle", _to_hf)


register(Layout("paddle", is_paddle, read))
