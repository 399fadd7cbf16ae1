"""What the GGUF format itself fixes, shared by its reader, its writer and every GGML encoder: a tensor's size in
bytes (gguf-py's quant_shape_to_byte_shape over GGML_QUANT_SIZES, dense types included)."""
from __future__ import annotations

import math

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from ..core.errors import OutputError


def tensor_nbytes(np_shape, qtype: GGMLQuantizationType) -> int:
    """Bytes of a `qtype` tensor of numpy shape `np_shape` (rows of whole blocks); OutputError otherwise."""
    try:
        return math.prod(quant_shape_to_byte_shape(np_shape, qtype))
    except ValueError:
        raise OutputError(f"row length {np_shape[-1]} is not a multiple of {qtype.name}'s block of "
                          f"{GGML_QUANT_SIZES[qtype][0]}") from None
