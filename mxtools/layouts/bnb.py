"""bitsandbytes layout (read only): an HF directory whose config's `quantization_config.quant_method` is
"bitsandbytes", what transformers' save_pretrained writes for a model loaded with a BitsAndBytesConfig
(docs/FORMATS.md, section 10): 4-bit NF4 / FP4 (with or without nested "double" quantization of the absmax)
or 8-bit LLM.int8.

Each quantized Linear appears under its canonical `.weight` name as a LazyTensor whose load() dequantizes it
with bitsandbytes' own functions (io/bnb_decode.py, the optional extra `mxtools[bnb]`); without bitsandbytes
the reader stops with one line naming the extra. Every tensor is checked against the quantization state it
carries before any data is decoded; the modules bitsandbytes skipped (transformers 5 quantizes only
nn.Linear modules: the experts, stored as fused parameters, the router and lm_head stay float) are read as
stored.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.errors import FormatError
from ..core.tensors import Checkpoint, LazyTensor
from ..core.values import is_kind
from ..io.bnb_decode import QUANT_TYPES, dequantize_4bit, dequantize_int8, functional, quant_state
from ..io.hf_dir import (
    quant_config,
    read_decoded,
    read_json,
    spec_from_config,
)
from . import Layout, register

METHOD = "bitsandbytes"
STATE = "quant_state.bitsandbytes__"
FOUR_BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_PARTS = ("SCB", "weight_format")


def is_bnb(path: Path) -> bool:
    return quant_config(Path(path), METHOD) is not None


def settings(qc: dict, source) -> dict:
    """bits (4 or 8), quant_type (nf4 | fp4 for 4 bits) and double quantization, from the config's booleans."""
    four, eight = (qc.get(k, qc.get("_" + k, False)) for k in ("load_in_4bit", "load_in_8bit"))
    if not is_kind(four, bool) or not is_kind(eight, bool) or four == eight:
        raise FormatError(f"bitsandbytes load_in_4bit={str(four)[:20]} and load_in_8bit={str(eight)[:20]}: exactly "
                          "one must be true", file=source)
    qtype, double = qc.get("bnb_4bit_quant_type", "fp4"), qc.get("bnb_4bit_use_double_quant", False)
    if four and (qtype not in QUANT_TYPES or not is_kind(double, bool)):
        raise FormatError(f"bitsandbytes bnb_4bit_quant_type {str(qtype)[:40]!r} is not supported (nf4 or fp4), or "
                          "bnb_4bit_use_double_quant is not true or false", file=source)
    return {"bits": 4 if four else 8, "quant_type": qtype if four else "int8", "double_quant": bool(four and double)}


# ---------------------------------------------------------------- modules

def _describe(parts: dict) -> str:
    return ", ".join(f"{s} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for s, t in sorted(parts.items()))


def _numel(t: LazyTensor) -> int:
    return math.prod(t.shape)


def _four_bit(base: str, weight: LazyTensor, parts: dict, st: dict, source) -> LazyTensor:
    """The lazy float32 weight of a 4-bit module, its tensors checked against its quant_state first."""
    keys = [k for k in parts if k.startswith(STATE)]
    if len(keys) != 1 or st["bits"] != 4:
        why = "several quant_state tensors" if len(keys) > 1 else "a 4-bit quant_state in an 8-bit checkpoint"
        raise FormatError(f"bitsandbytes module has {why}", file=source, tensor=base)
    key = f"{base}.weight.{keys[0]}"
    state = quant_state(parts[keys[0]].load(), key, parts[keys[0]].source)
    if keys[0] != STATE + state["quant_type"] or state["quant_type"] != st["quant_type"]:
        raise FormatError(f"quant_state says {state['quant_type']}, its name {keys[0]} and the config "
                          f"{st['quant_type']}", file=source, tensor=key)
    missing = [p for p in ("absmax", "quant_map") if p not in parts]
    nested = "nested_blocksize" in state
    missing += [p for p in ("nested_absmax", "nested_quant_map") if nested and p not in parts]
    if missing:
        raise FormatError(f"4-bit module lacks {', '.join('weight.' + m for m in missing)}", file=source, tensor=base)
    n = math.prod(state["shape"])
    blocks = -(-n // state["blocksize"])
    absmax = parts["absmax"]
    ok = (weight.dtype == torch.uint8 and _numel(weight) == -(-n // 2) and _numel(absmax) == blocks
          and absmax.dtype == (torch.uint8 if nested else torch.float32)
          and parts["quant_map"].dtype == torch.float32 and _numel(parts["quant_map"]) == 16)
    if ok and nested:
        ok = (parts["nested_absmax"].dtype == torch.float32 and parts["nested_quant_map"].dtype == torch.float32
              and _numel(parts["nested_absmax"]) == -(-blocks // state["nested_blocksize"])
              and _numel(parts["nested_quant_map"]) == 256)
    if not ok or (not nested and "nested_absmax" in parts):
        raise FormatError(f"inconsistent 4-bit tensors for quant_state shape {state['shape']}, blocksize "
                          f"{state['blocksize']}: weight {str(weight.dtype).removeprefix('torch.')} "
                          f"{list(weight.shape)}, {_describe(parts)}", file=weight.source, tensor=base)

    def load() -> torch.Tensor:
        return dequantize_4bit(weight.load(), state, {p: parts[p].load() for p in FOUR_BIT_PARTS if p in parts})
    return _lazy(base, tuple(state["shape"]), load, weight.source, f"bnb-{state['quant_type']}")


def _int8(base: str, weight: LazyTensor, parts: dict, st: dict, source) -> LazyTensor:
    """The lazy float32 weight of an LLM.int8 module: int8 [out, in] and SCB [out]."""
    if "SCB" not in parts or st["bits"] != 8:
        why = "lacks SCB" if "SCB" not in parts else "is 8-bit in a 4-bit checkpoint"
        raise FormatError(f"bitsandbytes int8 module {why}", file=source, tensor=base)
    scb, fmt = parts["SCB"], parts.get("weight_format")
    ok = (weight.dtype == torch.int8 and len(weight.shape) == 2 and scb.dtype.is_floating_point
          and tuple(scb.shape) == (weight.shape[0],) and (fmt is None or (_numel(fmt) == 1 and fmt.dtype in (
              torch.uint8, torch.int8, torch.int32, torch.int64))))
    if not ok:
        raise FormatError(f"inconsistent int8 tensors: weight {str(weight.dtype).removeprefix('torch.')} "
                          f"{list(weight.shape)}, {_describe(parts)}", file=weight.source, tensor=base)

    def load() -> torch.Tensor:
        if fmt is not None and int(fmt.load().reshape(-1)[0]) != 0:
            raise FormatError("weight_format is not 0 (row-major): another int8 tile layout", file=fmt.source,
                              tensor=base + ".weight_format")
        return dequantize_int8(weight.load(), scb.load())
    return _lazy(base, tuple(weight.shape), load, weight.source, "bnb-int8")


def _lazy(base: str, shape, load, source, stored_as: str) -> LazyTensor:
    def checked() -> torch.Tensor:
        try:
            return load()
        except FormatError:
            raise
        except (ValueError, RuntimeError, AssertionError, KeyError, IndexError) as exc:
            raise FormatError(f"bitsandbytes cannot dequantize it: {str(exc)[:160]}", file=source,
                              tensor=base + ".weight") from None
    return LazyTensor(base + ".weight", shape, torch.float32, checked, source, stored_as)


def _modules(raw: dict, st: dict, source) -> dict[str, LazyTensor]:
    """Stored keys -> stored-name tensors, each quantized module's parts replaced by its dequantized weight."""
    tensors, four, eight = {}, {}, {}
    for key, lazy in raw.items():
        if ".weight." in key:
            base, _, part = key.partition(".weight.")
            four.setdefault(base, {})[part] = lazy
        elif key.rpartition(".")[2] in INT8_PARTS:
            base, _, part = key.rpartition(".")
            eight.setdefault(base, {})[part] = lazy
        else:
            tensors[key] = lazy
    for base in sorted(set(four) | set(eight)):
        weight = tensors.get(base + ".weight")
        if weight is None:
            raise FormatError("quantization state without its weight", file=source, tensor=base + ".weight")
        if base in four and base in eight:
            raise FormatError("both 4-bit and int8 quantization states", file=source, tensor=base)
        make = _four_bit if base in four else _int8
        tensors[base + ".weight"] = make(base, weight, four.get(base) or eight[base], st, source)
    return tensors


def read(path: Path) -> Checkpoint:
    cfg_file = path / "config.json"
    st = settings(quant_config(path, METHOD), cfg_file)
    functional(cfg_file)  # bitsandbytes present, or one line naming the extra
    cfg = read_json(cfg_file)
    spec = spec_from_config(cfg, cfg_file)
    renamed, naming, router, tok, closers = read_decoded(path, lambda raw: _modules(raw, st, path))
    version = cfg.get("transformers_version")
    writer = f"transformers {version[:40]} with bitsandbytes" if is_kind(version, str) else \
        "transformers with bitsandbytes"
    info = {"quant_method": METHOD, "format": st["quant_type"], "double_quant": st["double_quant"],
            "tensor_names": naming, "router_name": router, "written_by": writer, "outtype": f"bnb-{st['quant_type']}",
            "quantized": str(sum(1 for t in renamed.values() if t.stored_as))}
    ckpt = Checkpoint(spec, renamed, METHOD, path, tok, info=info)
    ckpt.closers += closers
    return ckpt


register(Layout(METHOD, is_bnb, read))
