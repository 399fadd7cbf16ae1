"""The recipes shipped inside the package, and the one place every verb looks them up.

Two groups: "" holds the `quantize` recipes (gptq-*.yaml, rtn-*.yaml), "gguf" holds llama.cpp's mixes for
`convert --outtype` (q4_k_m.yaml, ...). They are read through importlib.resources, so an installed wheel
finds exactly the files a checkout has. `find` also takes the path of a user's own YAML file
(`quantize --recipe my.yaml`).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.abc import Traversable

SUFFIX = ".yaml"


def _group(group: str) -> Traversable:
    root = files(__name__)
    return root / group if group else root


def names(group: str = "") -> tuple[str, ...]:
    """The shipped recipe names of `group`, sorted (file names without .yaml)."""
    d = _group(group)
    if not d.is_dir():
        return ()
    return tuple(sorted(p.name[:-len(SUFFIX)] for p in d.iterdir() if p.name.endswith(SUFFIX) and p.is_file()))


def find(name_or_path, group: str = "") -> Traversable | None:
    """An existing file given by path, else the shipped recipe `name_or_path` of `group`, else None."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _group(group) / f"{name_or_path}{SUFFIX}"
    return shipped if shipped.is_file() else None
