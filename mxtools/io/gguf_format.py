"""What the GGUF format itself fixes, shared by its reader, its writer and every GGML encoder: the magic and
versions (from gguf-py's constants), how each metadata value type is stored, and a tensor's size in bytes (gguf-py's
quant_shape_to_byte_shape over GGML_QUANT_SIZES, dense types included)."""
from __future__ import annotations

import math
import struct

from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from ..core.errors import OutputError

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF", the file's first four bytes
READ_VERSIONS = (2, GGUF_VERSION)  # what llama.cpp still reads; GGUF_VERSION (3) is written

# GGUF scalar value type -> its little-endian struct format (numpy reads the same string as a dtype); strings and
# arrays are length-prefixed. A boolean is one byte, any non-zero byte reading as true.
VALUE_FORMATS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
                 GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
                 GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
                 GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


def tensor_nbytes(np_shape, qtype: GGMLQuantizationType) -> int:
    """Bytes of a `qtype` tensor of numpy shape `np_shape` (rows of whole blocks); OutputError otherwise."""
    try:
        return math.prod(quant_shape_to_byte_shape(np_shape, qtype))
    except ValueError:
        raise OutputError(f"row length {np_shape[-1]} is not a multiple of {qtype.name}'s block of "
                          f"{GGML_QUANT_SIZES[qtype][0]}") from None
