"""GPTQ v1 layout: an HF directory whose Linears are stored as qweight/qzeros/scales/g_idx
(docs/FORMATS.md, section 7).

What vLLM, exllama, transformers (through gptqmodel) and GPTQModel load: config.json with a
`quantization_config` (quant_method "gptq", checkpoint_format "gptq"), the same in quantize_config.json, sharded
safetensors + index, the tokenizer files. The router, norms, embeddings and lm_head stay float `.weight`s.

Reader: every quantized Linear appears under its canonical `.weight` name as a LazyTensor whose load() returns
the dequantized float32 weight (exactly what a v1 loader computes), so the forward pass, `verify` and `convert`
work on GPTQ directories unchanged. Writer: streams one layer at a time out of a QuantStream (quant/gptq_pipeline),
never holding more than that layer's results; `quantize_report.json` records how every Linear was quantized.

Tensor names (`--names`, NAMINGS): "vllm" (default) stores the canonical transformers 4.x names, which vLLM's
Mixtral loader maps onto its fused MoE; "transformers" stores transformers 5's per-expert names, which GPTQModel
7.x checks for. The reader also takes AutoRound's spelling ("autoround", READ_NAMINGS) and either router name,
found from the tensor names alone; GPTQModel's v2 packing ("gptq_v2") and per-module `dynamic` bits; `convert
--to gptq` of a GPTQ checkpoint re-exports it byte for byte.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Protocol

import torch

from ..core import names
from ..core.defaults import GPTQ_NAMINGS, SHARD_BYTES
from ..core.errors import FormatError, MxError
from ..core.expert_names import SPELLINGS, canonical_key, name_table
from ..core.names import NameTable
from ..core.names import is_gptq_quantized as is_quantized
from ..core.tensors import FLOAT_DTYPES, Checkpoint, LazyTensor
from ..core.values import MAX_DIM, is_kind
from ..io.gptq_pack import SUFFIXES, dequantize, pack
from ..io.hf_dir import (
    QUANT_CONFIG_FILE,
    config_from_spec,
    gptq_quant_config,
    read_decoded,
    read_json,
    read_tensors,
    shard_files,
    spec_from_config,
    write_json,
    write_shards,
    write_tokenizer,
)
from . import Layout, WriteOptions, register

REPORT_FILE = "quantize_report.json"
V1_FORMATS = ("gptq", None)  # checkpoint_format values whose qzeros store zero - 1 (v1); missing means v1
V2_FORMAT = "gptq_v2"  # GPTQModel's v2: qzeros store the zero itself
TOOL = "mxtools"

# Tensor names per runtime (core/expert_names.py): vllm: vllm/model_executor/models/mixtral.py maps
# `block_sparse_moe.experts.{e}.w1|w2|w3` (its expert_params_mapping) and keeps `block_sparse_moe.gate` a plain
# unquantized Linear. transformers: transformers 5 calls the MoE block `mlp` and the experts gate/up/down_proj;
# GPTQModel 7.x (models/definitions/mixtral.py, module_tree "mlp|block_sparse_moe" > "experts" > "gate_proj|w1"
# ...) looks for the quantized tensors under these names before any renaming. autoround: read only.
READ_NAMINGS = tuple(SPELLINGS)
NAMINGS = {n: name_table(n) for n in GPTQ_NAMINGS}  # the names the command line offers (core.defaults), in order
DEFAULT_NAMES = GPTQ_NAMINGS[0]


# ---------------------------------------------------------------- detection and config

def is_gptq(path: Path) -> bool:
    return gptq_quant_config(Path(path)) is not None


def stored_name(canonical: str, table: NameTable) -> str:
    """The key a canonical tensor (`x.weight`, or a quantized part `x.qweight` ...) has under `table`."""
    base, _, suffix = canonical.rpartition(".")
    return table.to_layout(base + ".weight")[0].removesuffix("weight") + suffix


def writer_of(qc: dict) -> str | None:
    """The tool that probably wrote a GPTQ config, from what the config itself says: GPTQModel's and mxtools'
    `meta.quantizer` (or a top-level `quantizer`), a `packer`, AutoRound's `autoround_version` or a `provider`;
    None when it says nothing."""
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    for field in (meta.get("quantizer"), qc.get("quantizer"), meta.get("packer"), qc.get("packer")):
        names_ = field if isinstance(field, list) else [field]
        hit = next((n for n in names_ if isinstance(n, str) and n), None)
        if hit:
            return hit[:80]
    if isinstance(qc.get("autoround_version"), str):  # AutoRound also writes "provider": "auto-round"
        return f"auto-round:{qc['autoround_version'][:40]}"
    return qc["provider"][:80] if isinstance(qc.get("provider"), str) and qc["provider"] else None


class Settings(Protocol):
    """What the writer records and sizes the tensors by (quant.gptq.QuantConfig is one)."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool
    damp: float
    static_groups: bool
    mse: bool

    def group_len(self, in_features: int) -> int: ...


def gptq_config(cfg: Settings, model_name: str, naming: str = DEFAULT_NAMES) -> dict:
    """quantize_config.json (also config.json["quantization_config"]) in the AutoGPTQ/GPTQModel spelling."""
    return {
        "bits": cfg.bits, "group_size": cfg.group_size, "damp_percent": cfg.damp, "desc_act": cfg.act_order,
        "static_groups": cfg.static_groups, "sym": cfg.sym, "true_sequential": True, "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
        "model_name_or_path": model_name, "model_file_base_name": "model",
        "meta": {"quantizer": [TOOL], "mse": cfg.mse, "tensor_names": naming},
    }


def _settings(qc: dict, source) -> dict:
    """bits, group_size, ... of a GPTQ config; refuses the formats whose packing differs from v1 and v2."""
    fmt = qc.get("checkpoint_format") or qc.get("format")
    if fmt not in (*V1_FORMATS, V2_FORMAT):
        raise FormatError(f"GPTQ checkpoint_format {fmt!r:.40} is not supported (v1 \"gptq\" or \"gptq_v2\")",
                          file=source)
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    sym, desc_act = qc.get("sym", True), qc.get("desc_act", False)
    if not is_kind(bits, int) or bits not in (2, 4, 8):
        raise FormatError(f"GPTQ bits={str(bits)[:40]} is not supported (2, 4 or 8)", file=source)
    if not is_kind(group, int) or not (group == -1 or 0 < group <= MAX_DIM):
        raise FormatError(f"GPTQ group_size={str(group)[:40]} is not -1 or a positive integer", file=source)
    if not is_kind(sym, bool) or not is_kind(desc_act, bool):
        raise FormatError("GPTQ sym and desc_act must be true or false", file=source)
    return {"bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act, "checkpoint_format": fmt or "gptq",
            "dynamic": _dynamic_bits(qc.get("dynamic"), source)}


def _dynamic_bits(dynamic, source) -> list[tuple[re.Pattern, int]]:
    """GPTQModel's per-module overrides (`dynamic`, which AutoRound writes too): regex -> settings, a "-:" regex
    leaving modules unquantized (they are stored as float weights, so nothing to read), a "+:" or bare one
    overriding `bits` for the modules it matches. Returned: (pattern, bits) of the overrides that set bits."""
    if dynamic is None:
        return []
    if not isinstance(dynamic, dict):
        raise FormatError("GPTQ dynamic is not an object", file=source)
    rules = []
    for rule, override in dynamic.items():
        if not isinstance(override, dict):
            raise FormatError(f"GPTQ dynamic rule {rule[:40]!r} is not an object", file=source)
        if rule.startswith("-:") or "bits" not in override:
            continue
        bits = override["bits"]
        if type(bits) is not int or bits not in (2, 4, 8):
            raise FormatError(f"GPTQ dynamic rule {rule[:40]!r}: bits={str(bits)[:40]} is not supported (2, 4 or 8)",
                              file=source)
        try:
            rules.append((re.compile(rule.removeprefix("+:")), bits))
        except (re.error, RecursionError, OverflowError):
            raise FormatError(f"GPTQ dynamic rule {rule[:40]!r} is no regular expression", file=source) from None
    return rules


def layer_bits(module: str, settings: dict) -> int:
    """The bits of the stored module `module`: the first dynamic override matching it, else the config's."""
    return next((bits for rx, bits in settings["dynamic"] if rx.match(module)), settings["bits"])


# ---------------------------------------------------------------- reader

def _check_parts(base: str, parts: dict, bits: int, source) -> None:
    """The four v1 tensors agree with each other (docs/FORMATS.md, section 7): qweight int32 [in/per, out], qzeros int32
    [groups, out/per], scales float [groups, out], g_idx int32 [in]; checked before any data is read."""
    missing = [s for s in SUFFIXES if s not in parts]
    if missing:
        raise FormatError(f"quantized tensor lacks {', '.join(missing)}", file=source, tensor=base)
    per = 32 // bits
    qweight, qzeros, scales, g_idx = (parts[s] for s in ("qweight", "qzeros", "scales", "g_idx"))
    ok = len(scales.shape) == 2 and len(g_idx.shape) == 1 and scales.dtype.is_floating_point
    if ok:
        (groups, out_f), (in_f,) = scales.shape, g_idx.shape
        ok = (groups > 0 and qweight.shape == (in_f // per, out_f) and in_f % per == 0 and out_f % per == 0
              and qzeros.shape == (groups, out_f // per)
              and all(parts[s].dtype == torch.int32 for s in ("qweight", "qzeros", "g_idx")))
    if not ok:
        raise FormatError(f"inconsistent GPTQ tensors at {bits} bits: " + ", ".join(
            f"{s} {str(parts[s].dtype).removeprefix('torch.')} {list(parts[s].shape)}" for s in SUFFIXES),
            file=scales.source, tensor=base)


def _dequantized(base: str, parts: dict, bits: int, zero_offset: int) -> LazyTensor:
    """The canonical `<base>.weight` whose load() dequantizes the four tensors of `base` (v1: `zero_offset` 1)."""
    scales, g_idx = parts["scales"], parts["g_idx"]
    shape = (scales.shape[1], g_idx.shape[0])
    name = base + ".weight"

    def load() -> torch.Tensor:
        loaded = {s: parts[s].load() for s in SUFFIXES}
        gi = loaded["g_idx"]
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= scales.shape[0]):
            raise FormatError(f"g_idx holds group {int(gi.min()) if int(gi.min()) < 0 else int(gi.max())} "
                              f"outside 0..{scales.shape[0] - 1}", file=g_idx.source, tensor=base + ".g_idx")
        try:
            return dequantize(loaded, bits, zero_offset)
        except (MxError, IndexError, RuntimeError) as exc:
            raise FormatError(f"cannot dequantize: {exc}", file=scales.source, tensor=name) from None
    return LazyTensor(name, shape, torch.float32, load, scales.source, f"gptq-int{bits}")


def read(path: Path) -> Checkpoint:
    qc = gptq_quant_config(path)
    settings = _settings(qc, path / "config.json")
    zero_offset = 0 if settings["checkpoint_format"] == V2_FORMAT else 1
    spec = spec_from_config(read_json(path / "config.json"), path / "config.json")

    def decode(raw: dict) -> dict:
        tensors, groups = {}, {}
        for key, lazy in raw.items():
            base, _, suffix = key.rpartition(".")
            if suffix in SUFFIXES:
                groups.setdefault(base, {})[suffix] = lazy
            else:
                tensors[key] = lazy  # HF naming is the canonical one; unknown keys fail validation
        for base, parts in groups.items():
            bits = layer_bits(base, settings)
            _check_parts(base, parts, bits, path)
            tensors[base + ".weight"] = _dequantized(base, parts, bits, zero_offset)
        return tensors

    tensors, naming, router, tok, closers = read_decoded(path, decode)
    info = {"quant_method": "gptq", "gptq": {k: v for k, v in settings.items() if k != "dynamic"},
            "tensor_names": naming, "router_name": router, "checkpoint_format": settings["checkpoint_format"],
            "written_by": writer_of(qc)}
    ckpt = Checkpoint(spec, tensors, "gptq", path, tok, info=info)
    ckpt.closers += closers
    return ckpt


# ---------------------------------------------------------------- writer

def plan(spec, cfg: Settings, float_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, dtype, shape) of every tensor, in canonical order, each quantized Linear as its four v1 tensors."""
    per = 32 // cfg.bits
    items = []
    for name in names.canonical_names(spec):
        shape = names.expected_shape(name, spec)
        if not is_quantized(name):
            items.append((name, float_dtype, shape))
            continue
        out_f, in_f = shape
        groups = in_f // cfg.group_len(in_f)
        base = name.removesuffix(".weight")
        items += [(f"{base}.qweight", torch.int32, (in_f // per, out_f)),
                  (f"{base}.qzeros", torch.int32, (groups, out_f // per)),
                  (f"{base}.scales", torch.float16, (groups, out_f)),
                  (f"{base}.g_idx", torch.int32, (in_f,))]
    return items


def _tensors(ckpt: Checkpoint, stream, float_dtype):
    """Every planned tensor in order: float ones loaded from ckpt, quantized ones packed from the stream's layers."""
    layers, current = iter(stream), None
    for name in names.canonical_names(ckpt.spec):
        if not is_quantized(name):
            yield ckpt.tensors[name].load().to(float_dtype).contiguous()
            continue
        layer = names.parse(name)[1]
        while current is None or current.index != layer:
            current = next(layers)
        yield from pack(current.results.pop(name)).values()  # pop: each layer's results freed as written
    if next(layers, None) is not None:  # running the stream to its end also fills its report totals
        raise MxError("the quantization stream yielded more layers than the model has")


def write_quantized(ckpt: Checkpoint, out: Path, stream, cfg: Settings, outtype: str = "f16",
                    progress=lambda n: None, shard_bytes: int = SHARD_BYTES, source_name: str | None = None,
                    names: str = DEFAULT_NAMES) -> None:
    """Write the GPTQ v1 directory into `out` (an existing empty dir; callers make it atomic) from `stream`,
    its tensors under the `names` naming (NAMINGS)."""
    dtype = FLOAT_DTYPES[outtype]
    items = [(stored_name(n, NAMINGS[names]), dt, shape) for n, dt, shape in plan(ckpt.spec, cfg, dtype)]
    data = _tensors(ckpt, stream, dtype)
    write_shards(out, items, data, shard_bytes, {"format": "pt", "quantizer": TOOL}, progress)
    next(data, None)  # let the generator finish the stream (its totals) after the last tensor
    qc = gptq_config(cfg, source_name or ckpt.spec.name, names)
    write_json(out / "config.json", {**config_from_spec(ckpt.spec, dtype), "quantization_config": qc})
    write_json(out / QUANT_CONFIG_FILE, qc)
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    write_tokenizer(ckpt.tokenizer, out)
    write_json(out / REPORT_FILE, getattr(stream, "report", {}))


def write(ckpt: Checkpoint, out: Path, opts: WriteOptions) -> None:
    """Layout writer (`convert --to gptq`): the layers of `opts.stream` (a quant.gptq_pipeline.QuantStream made
    with `opts.settings`; convert makes a round-to-nearest one) packed as GPTQ v1, or, without a stream, a GPTQ
    source re-exported as stored (`reexport`). `opts.names`: NAMINGS key (default: the source's, else vllm)."""
    if opts.stream is None:
        if ckpt.layout != "gptq":
            raise MxError("internal: the GPTQ writer needs a quantization stream for a float source")
        return reexport(ckpt, out, opts.names or ckpt.info["tensor_names"], opts.progress, opts.shard_bytes)
    write_quantized(ckpt, out, opts.stream, opts.settings, opts.outtype, opts.progress, opts.shard_bytes,
                    str(ckpt.path), opts.names or DEFAULT_NAMES)


# ---------------------------------------------------------------- lossless re-export under other names

def reexport(ckpt: Checkpoint, out: Path, naming: str, progress=lambda n: None, shard_bytes: int = SHARD_BYTES):
    """Every stored tensor of the GPTQ checkpoint `ckpt` byte for byte, in canonical order, under `naming`'s
    names; the two configs record the naming; every other file of the directory is copied as it is."""
    src = Path(ckpt.path)
    source = name_table(ckpt.info["tensor_names"], ckpt.info["router_name"])  # read() named them from the same keys
    target = source if naming == ckpt.info["tensor_names"] else name_table(naming)
    raw, opened = read_tensors(shard_files(src), NameTable({}))
    try:
        stored = {canonical_key(k, source): t for k, t in raw.items()}
        order = list(_stored_order(ckpt.spec, stored))
        left = sorted(set(stored) - set(order))
        if left:
            raise FormatError(f"{len(left)} stored tensor(s) are no part of the model: {', '.join(left[:5])}",
                              file=src, tensor=left[0])
        items = [(stored_name(n, target), stored[n].dtype, tuple(stored[n].shape)) for n in order]
        write_shards(out, items, (stored[n].load() for n in order), shard_bytes,
                        {"format": "pt", "quantizer": TOOL}, progress)
    finally:
        for f in opened:
            f.close()
    qc = {**gptq_quant_config(src)}
    qc["meta"] = {**(qc.get("meta") if is_kind(qc.get("meta"), dict) else {}), "tensor_names": naming}
    write_json(out / "config.json", {**read_json(src / "config.json"), "quantization_config": qc})
    write_json(out / QUANT_CONFIG_FILE, qc)
    skip = {"config.json", QUANT_CONFIG_FILE, "model.safetensors.index.json"}
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copyfile(f, out / f.name)


def _stored_order(spec, stored: dict):
    """Canonical names of the tensors in `stored`, in writing order (a quantized Linear as its four parts)."""
    for name in names.canonical_names(spec):
        base = name.removesuffix(".weight")
        yield from ([f"{base}.{s}" for s in SUFFIXES] if f"{base}.qweight" in stored else [name])


register(Layout("gptq", is_gptq, read, write))
