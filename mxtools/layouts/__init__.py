"""Layout registry: each layout module registers a reader (and maybe a writer); detection uses file names,
key patterns and shapes found inside a path, never folder names."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LayoutError
from ..tensors import Checkpoint


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], Checkpoint]
    write: Callable | None = None   # write(ckpt, out_path, outtype, progress, **options)
    output_is_dir: bool = True


REGISTRY: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    if layout.name in REGISTRY:
        raise ValueError(f"layout {layout.name} registered twice")
    REGISTRY[layout.name] = layout
    return layout


def writable() -> list[str]:
    return [n for n, lay in REGISTRY.items() if lay.write]


def detect(path) -> Layout:
    path = Path(path)
    if not path.exists():
        raise LayoutError("no such file or directory", file=path)
    found = [lay for lay in REGISTRY.values() if lay.detect(path)]
    if len(found) != 1:
        what = "no known Mixtral layout" if not found else f"ambiguous layout ({', '.join(f.name for f in found)})"
        raise LayoutError(f"{what} found here (expected an HF, Mistral or GGUF checkpoint)", file=path)
    return found[0]


def open_checkpoint(path, validate: bool = True) -> Checkpoint:
    """Open any supported checkpoint lazily, in canonical naming; validated against its own config."""
    ckpt = detect(path).read(Path(path))
    try:
        return ckpt.validate() if validate else ckpt
    except BaseException:
        ckpt.close()
        raise


from . import gguf, hf, mistral, paddle  # noqa: F401  (registration)
