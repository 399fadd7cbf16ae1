"""The table of GGML block types mxtools can quantize to; each type module registers itself here."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# fn(rows float32 [r, n] C-contiguous, imatrix float32 [n] or None) -> uint8 [r * n // block, type_size]
RowQuantizer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


@dataclass(frozen=True)
class BlockType:
    """One quantizer: its GGML type, block geometry (from gguf-py's table) and the row function."""

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    fn: RowQuantizer


SUPPORTED: dict[GGMLQuantizationType, BlockType] = {}


def register(qtype: GGMLQuantizationType) -> Callable[[RowQuantizer], RowQuantizer]:
    """Decorator: register a row quantizer for qtype; a second registration is refused."""

    def add(fn: RowQuantizer) -> RowQuantizer:
        if qtype in SUPPORTED:
            raise ValueError(f"GGML type {qtype.name} is already registered")
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        SUPPORTED[qtype] = BlockType(qtype, block_size, type_size, fn)
        return fn

    return add
