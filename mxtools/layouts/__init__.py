"""Layout registry: each layout module registers a reader (and maybe a writer); detection uses file names,
key patterns and shapes found inside a path, never folder names."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.defaults import SHARD_BYTES, WRITABLE_LAYOUTS
from ..core.errors import LayoutError
from ..core.tensors import Checkpoint


def no_progress(n: int) -> None:
    pass


@dataclass(frozen=True)
class WriteOptions:
    """Everything a layout writer may be told. Each writer reads the fields of its own format and ignores the
    others; `convert.write_checkpoint` fills them."""

    outtype: str  # f32 | f16 | bf16, or a llama.cpp mix for gguf
    progress: Callable[[int], None] = no_progress  # called with the bytes of each tensor written
    shard_bytes: int = SHARD_BYTES  # hf, gptq: the largest shard
    # gguf
    policy: Callable | None = None  # (kind key, layer, numpy shape) -> GGML type; None: every weight in outtype
    file_type: int | None = None  # general.file_type; None: the float outtype's
    imatrix: dict | None = None  # canonical name -> importance vector for the block quantizers
    extra_metadata: tuple = ()  # more (key, GGUFValueType, value) rows
    encoded: Callable | None = None  # (canonical tensor, GGML type) -> its bytes already encoded, or None
    # gptq
    stream: Iterable | None = None  # the quantized layers (quant.gptq_pipeline.QuantStream); None: re-export
    settings: Any = None  # what the stream was made with (bits, group size, ...: layouts.gptq.Settings)
    names: str | None = None  # tensor naming (layouts.gptq.NAMINGS); None: the source's, else vllm


class Writer(Protocol):
    """A layout's writer: `ckpt` into `out` (a new empty directory, or a file path for single-file layouts)."""

    def __call__(self, ckpt: Checkpoint, out: Path, opts: WriteOptions) -> None: ...


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], Checkpoint]
    write: Writer | None = None
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


from . import gguf, hf, gptq, mistral, paddle, compressed, bnb  # noqa: F401, I001  (registration, in the order `--to` lists them)

if tuple(writable()) != WRITABLE_LAYOUTS:  # the command line offers core.defaults' list without importing this
    raise ImportError(f"core.defaults.WRITABLE_LAYOUTS is {WRITABLE_LAYOUTS}, the registry has {tuple(writable())}")
