"""bitsandbytes' serialized weights (transformers' save_pretrained of a BitsAndBytesConfig model), decoded by
bitsandbytes' own functions (the optional extra `mxtools[bnb]`; docs/FORMATS.md, section 10).

4-bit (NF4 / FP4), per Linear `<base>`: `<base>.weight` uint8 [ceil(n / 2), 1] (two 4-bit codes per byte, n =
out * in), `.weight.absmax` (float32 [ceil(n / blocksize)], or uint8 under nested "double" quantization),
`.weight.quant_map` float32 [16], under nested quantization also `.weight.nested_absmax` float32 and
`.weight.nested_quant_map` float32 [256], and `.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON
object stored as uint8 bytes (quant_type, blocksize, dtype, shape; nested_blocksize, nested_dtype,
nested_offset). int8 (LLM.int8): `<base>.weight` int8 [out, in], `<base>.SCB` float32 [out] (each row's absolute
maximum), `<base>.weight_format` uint8 (0: row-major). W[o, i] = weight[o, i] * SCB[o] / 127.
"""
from __future__ import annotations

import json
import logging
import math

import torch

from ..core.errors import FormatError, MxError

INSTALL = "pip install 'mxtools[bnb]'"
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOATS = ("float16", "bfloat16", "float32")


def functional(source=None):
    """bitsandbytes.functional, imported quietly (its CPU backend logs a warning about an optional kernel
    package); an MxError naming `source` and the extra to install when bitsandbytes is missing."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise MxError(f"bitsandbytes is not installed, which reads this checkpoint: {INSTALL}", file=source) from None
    finally:
        quiet.setLevel(level)
    return F


def quant_state(raw: torch.Tensor, key: str, source) -> dict:
    """The JSON object a `quant_state.bitsandbytes__<type>` uint8 tensor holds, its fields checked."""
    try:
        state = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError("quant_state is not a JSON object in UTF-8", file=source, tensor=key) from None
    if not isinstance(state, dict):
        raise FormatError("quant_state is not a JSON object", file=source, tensor=key)
    shape = state.get("shape")
    ok = (state.get("quant_type") in QUANT_TYPES and state.get("blocksize") in BLOCKSIZES
          and state.get("dtype") in FLOATS and isinstance(shape, list) and len(shape) == 2
          and all(type(v) is int and 0 < v <= 1 << 20 for v in shape))
    nested = "nested_blocksize" in state or "nested_offset" in state
    if ok and nested:
        off = state.get("nested_offset")
        ok = (state.get("nested_blocksize") in BLOCKSIZES and state.get("nested_dtype") in FLOATS
              and type(off) in (int, float) and math.isfinite(off))
    if not ok:
        raise FormatError(f"quant_state {json.dumps(state)[:160]} is not a bitsandbytes 4-bit state (quant_type "
                          "nf4|fp4, blocksize, dtype, shape [out, in], nested fields)", file=source, tensor=key)
    return state


def dequantize_4bit(weight: torch.Tensor, state: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of `weight` with the state `state` (quant_state's JSON) and `tensors`
    (absmax, quant_map, nested_absmax, nested_quant_map), as float32 [out, in]."""
    F = functional()
    d = {**state, "absmax": tensors["absmax"], "quant_map": tensors["quant_map"]}
    if "nested_absmax" in tensors:
        d.update(nested_absmax=tensors["nested_absmax"], nested_quant_map=tensors["nested_quant_map"])
    qs = F.QuantState.from_dict(d, torch.device("cpu"))
    return F.dequantize_4bit(weight, qs).float().reshape(state["shape"]).contiguous()


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' int8_vectorwise_dequant: float32 weight[o, i] * SCB[o] / 127."""
    return functional().int8_vectorwise_dequant(weight, scb.float()).float().contiguous()
