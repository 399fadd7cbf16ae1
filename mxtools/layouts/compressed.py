"""compressed-tensors layout (read only): an HF directory whose config's `quantization_config.quant_method` is
"compressed-tensors", what llm-compressor saves for vLLM (docs/FORMATS.md, section 9).

Formats read: "pack-quantized" (int4 / int8 codes packed into int32, W4A16 / W8A16, grouped, per channel or
per tensor, symmetric or with `weight_zero_point`, `weight_g_idx` where stored), "float-quantized" (FP8 e4m3
weights, one scale per tensor or per row) and "dense" (float weights, quantization parameters ignored).
Every quantized Linear appears under its canonical `.weight` name as a LazyTensor whose load() decodes it to
float32 (io/compressed_pack.py, compressed-tensors' own arithmetic); modules llm-compressor left unquantized
(its `ignore` list: the router, lm_head) are the float tensors stored. Activation and KV-cache scales are not
part of the weights and are dropped. Everything is decided from the config and the tensor names and dtypes.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..core.errors import FormatError, ShapeError
from ..core.tensors import Checkpoint, LazyTensor
from ..core.values import MAX_DIM, is_kind
from ..io.compressed_pack import PACK_BITS, fp8_weight, int_weight, packed_cols
from ..io.hf_dir import (
    quant_config,
    read_decoded,
    read_json,
    spec_from_config,
)
from ..io.safetensors import DTYPES, SafetensorsFile
from . import Layout, register

METHOD = "compressed-tensors"
FORMATS = ("pack-quantized", "float-quantized", "dense")
STRATEGIES = {"pack-quantized": ("group", "channel", "tensor"), "float-quantized": ("channel", "tensor")}
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
# activation and KV-cache quantization parameters: no part of the weights
DROPPED = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
           "k_scale", "v_scale", "weight_global_scale")
FP8_DTYPES = {**DTYPES, "F8_E4M3": torch.float8_e4m3fn}


def is_compressed(path: Path) -> bool:
    return quant_config(Path(path), METHOD) is not None


# ---------------------------------------------------------------- config

def _scheme(name: str, group: dict, fmt: str, source) -> dict:
    """One config group's weight scheme, checked: bits, type, strategy, group_size, symmetric."""
    w = group.get("weights")
    where = f"quantization_config group {name[:40]!r}"
    if not is_kind(w, dict):
        raise FormatError(f"{where} has no weights object", file=source)
    bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
    gsize, sym = w.get("group_size"), w.get("symmetric", True)
    if fmt == "pack-quantized" and (kind != "int" or not is_kind(bits, int) or bits not in PACK_BITS):
        raise FormatError(f"{where}: pack-quantized {str(kind)[:20]} num_bits={str(bits)[:20]} is not supported "
                          "(int with 4 or 8 bits)", file=source)
    if fmt == "float-quantized" and (kind != "float" or bits != 8 or not is_kind(bits, int)):
        raise FormatError(f"{where}: float-quantized {str(kind)[:20]} num_bits={str(bits)[:20]} is not supported "
                          "(float with 8 bits: FP8 e4m3)", file=source)
    if fmt in STRATEGIES and strategy not in STRATEGIES[fmt]:
        raise FormatError(f"{where}: strategy {str(strategy)[:40]!r} is not supported for {fmt} "
                          f"({', '.join(STRATEGIES[fmt])})", file=source)
    if strategy == "group" and not (is_kind(gsize, int) and 0 < gsize <= MAX_DIM):
        raise FormatError(f"{where}: group_size={str(gsize)[:40]} is not a positive integer", file=source)
    if not is_kind(sym, bool) or (fmt == "float-quantized" and not sym):
        raise FormatError(f"{where}: symmetric must be true or false (true for FP8)", file=source)
    targets = group.get("targets", ["Linear"])
    if not is_kind(targets, list) or not all(is_kind(t, str) for t in targets):
        raise FormatError(f"{where}: targets is not a list of strings", file=source)
    return {"format": fmt, "bits": bits, "strategy": strategy, "group_size": gsize if strategy == "group" else None,
            "symmetric": sym, "targets": targets}


def settings(qc: dict, source) -> dict:
    """The checked quantization config: {"format", "schemes": [scheme...], "version"}."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not is_kind(groups, dict) or not groups:
        raise FormatError("compressed-tensors quantization_config has no config_groups", file=source)
    schemes = []
    for name, group in groups.items():
        if not is_kind(group, dict):
            raise FormatError(f"quantization_config group {name[:40]!r} is not an object", file=source)
        gfmt = group.get("format") or fmt
        if gfmt not in FORMATS:
            raise FormatError(f"compressed-tensors format {str(gfmt)[:40]!r} is not supported "
                              f"({', '.join(FORMATS)})", file=source)
        if group.get("weights") is not None:
            schemes.append(_scheme(str(name), group, gfmt, source))
    sparsity = qc.get("sparsity_config")
    if sparsity not in (None, {}) and not (is_kind(sparsity, dict) and sparsity.get("format") in (None, "dense")):
        raise FormatError("sparsity_config: sparse compression is not supported", file=source)
    transform = qc.get("transform_config")
    if transform not in (None, {}) and not (is_kind(transform, dict) and not transform.get("config_groups")):
        raise FormatError("transform_config: weight transforms are not supported (the weights would need them "
                          "undone)", file=source)
    version = qc.get("version")
    return {"format": fmt, "schemes": schemes, "version": version if is_kind(version, str) else None}


def scheme_of(module: str, schemes: list[dict], source) -> dict:
    """The scheme of the stored module `module`: a group naming it, else one whose "re:" target matches it, else
    one targeting Linear (compressed-tensors' precedence)."""
    def rank(target: str) -> int | None:
        if target == module:
            return 0
        if target.startswith("re:"):
            try:
                return 1 if re.match(target[3:], module) else None
            except (re.error, RecursionError, OverflowError):
                raise FormatError(f"target {target[:40]!r} is no regular expression", file=source) from None
        return 2 if target == "Linear" else None
    ranked = [(r, s) for s in schemes for r in map(rank, s["targets"]) if r is not None]
    if not ranked:
        raise FormatError("quantized tensors of a module no config group targets", file=source, tensor=module)
    return min(ranked, key=lambda rs: rs[0])[1]


# ---------------------------------------------------------------- reader

def _describe(parts: dict) -> str:
    return ", ".join(f"{s} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for s, t in sorted(parts.items()))


def _packed(base: str, parts: dict, sc: dict, source) -> LazyTensor:
    """The lazy float32 weight of a pack-quantized module, its tensors checked against each other first."""
    bits, sym = sc["bits"], sc["symmetric"]
    need = ("weight_packed", "weight_scale", "weight_shape") + (() if sym else ("weight_zero_point",))
    missing = [s for s in need if s not in parts]
    if missing or (sym and "weight_zero_point" in parts):
        what = f"lacks {', '.join(missing)}" if missing else "has a weight_zero_point but its scheme is symmetric"
        raise FormatError(f"pack-quantized module {what}", file=source, tensor=base)
    shape = _weight_shape(base, parts["weight_shape"])
    out_f, in_f = shape
    groups = -(-in_f // sc["group_size"]) if sc["strategy"] == "group" else 1
    scale_ok = (parts["weight_scale"].shape == ((out_f, groups) if sc["strategy"] != "tensor" else (1,))
                or (sc["strategy"] == "tensor" and torch.Size(parts["weight_scale"].shape).numel() == 1))
    zp = parts.get("weight_zero_point")
    zp_ok = zp is None or (zp.shape == (packed_cols(out_f, bits), groups) and zp.dtype == torch.int32
                           if sc["strategy"] != "tensor" else torch.Size(zp.shape).numel() == 1)
    gi = parts.get("weight_g_idx")
    ok = (parts["weight_packed"].shape == (out_f, packed_cols(in_f, bits)) and scale_ok and zp_ok
          and parts["weight_packed"].dtype == torch.int32 and parts["weight_scale"].dtype.is_floating_point
          and (gi is None or (gi.shape == (in_f,) and not gi.dtype.is_floating_point)))
    if not ok:
        raise FormatError(f"inconsistent pack-quantized tensors at {bits} bits, {sc['strategy']} (weight_shape "
                          f"{list(shape)}): {_describe(parts)}", file=parts["weight_packed"].source, tensor=base)

    def load() -> torch.Tensor:
        t = {s: p.load() for s, p in parts.items() if s != "weight_shape"}
        return int_weight(t["weight_packed"], t["weight_scale"], shape, bits, sc["group_size"],
                          t.get("weight_zero_point"), t.get("weight_g_idx"))
    return _lazy(base, shape, load, parts["weight_packed"].source, f"compressed-int{bits}")


def _weight_shape(base: str, lazy: LazyTensor) -> tuple[int, int]:
    """weight_shape's two values, read now (16 bytes) so the other tensors can be checked against them."""
    if lazy.shape != (2,) or lazy.dtype.is_floating_point or lazy.dtype == torch.bool:
        raise FormatError(f"weight_shape is {str(lazy.dtype).removeprefix('torch.')} {list(lazy.shape)}, not two "
                          "integers", file=lazy.source, tensor=base + ".weight_shape")
    out_f, in_f = (int(v) for v in lazy.load().tolist())
    if not (0 < out_f <= MAX_DIM and 0 < in_f <= MAX_DIM):
        raise FormatError(f"weight_shape [{out_f}, {in_f}] is no Linear's shape", file=lazy.source,
                          tensor=base + ".weight_shape")
    return out_f, in_f


def _fp8(base: str, weight: LazyTensor | None, parts: dict, sc: dict, source) -> LazyTensor:
    scale = parts.get("weight_scale")
    if weight is None or scale is None:
        raise FormatError(f"float-quantized module lacks {'weight' if weight is None else 'weight_scale'}",
                          file=source, tensor=base)
    out_f = weight.shape[0] if len(weight.shape) == 2 else -1
    n = torch.Size(scale.shape).numel()
    ok = (weight.dtype == torch.float8_e4m3fn and out_f > 0 and scale.dtype.is_floating_point
          and set(parts) == {"weight_scale"}
          and (n == 1 if sc["strategy"] == "tensor" else tuple(scale.shape) in ((out_f, 1), (out_f,))))
    if not ok:
        raise FormatError(f"inconsistent float-quantized tensors ({sc['strategy']}): weight "
                          f"{str(weight.dtype).removeprefix('torch.')} {list(weight.shape)}, {_describe(parts)}",
                          file=weight.source, tensor=base)
    return _lazy(base, weight.shape, lambda: fp8_weight(weight.load(), scale.load()), weight.source, "compressed-fp8")


def _lazy(base: str, shape, load, source, stored_as: str) -> LazyTensor:
    def checked() -> torch.Tensor:
        try:
            return load()
        except (ShapeError, IndexError, RuntimeError) as exc:
            raise FormatError(f"cannot decode: {exc}", file=source, tensor=base + ".weight") from None
    return LazyTensor(base + ".weight", tuple(shape), torch.float32, checked, source, stored_as)


def _modules(raw: dict, st: dict, source) -> dict[str, LazyTensor]:
    """Stored keys -> stored-name tensors, each quantized module's parts replaced by its decoded weight."""
    tensors, parts = {}, {}
    for key, lazy in raw.items():
        base, _, suffix = key.rpartition(".")
        if suffix in DROPPED:
            continue
        if suffix in PARTS:
            parts.setdefault(base, {})[suffix] = lazy
        else:
            tensors[key] = lazy
    for base, p in sorted(parts.items()):
        sc = scheme_of(base, st["schemes"], source) if st["schemes"] else None
        fmt = sc["format"] if sc else "dense"
        if fmt == "dense":  # float weights saved uncompressed: the parameters only describe them
            continue
        if fmt == "float-quantized":
            tensors[base + ".weight"] = _fp8(base, tensors.get(base + ".weight"), p, sc, source)
        elif base + ".weight" in tensors:
            raise FormatError("pack-quantized module also stores a float weight", file=source, tensor=base)
        else:
            tensors[base + ".weight"] = _packed(base, p, sc, source)
    fp8 = next((k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn and not t.stored_as), None)
    if fp8 is not None:
        raise FormatError("FP8 weight without its weight_scale", file=tensors[fp8].source, tensor=fp8)
    return tensors


def read(path: Path) -> Checkpoint:
    cfg_file = path / "config.json"
    st = settings(quant_config(path, METHOD), cfg_file)
    spec = spec_from_config(read_json(cfg_file), cfg_file)
    renamed, naming, router, tok, closers = read_decoded(path, lambda raw: _modules(raw, st, path),
                                                         opener=lambda f: SafetensorsFile(f, FP8_DTYPES))
    kinds = sorted({t.stored_as for t in renamed.values() if t.stored_as})
    info = {"quant_method": METHOD, "format": st["format"] or "mixed", "tensor_names": naming,
            "router_name": router, "written_by": _writer(path, st), "outtype": _outtype(kinds),
            "quantized": ", ".join(kinds) or "none"}
    ckpt = Checkpoint(spec, renamed, METHOD, path, tok, info=info)
    ckpt.closers += closers
    return ckpt


def _outtype(kinds: list[str]) -> str:
    """verify's label: w4a16 / w8a16 (int4 / int8 weights), fp8, or the kinds joined."""
    label = {"compressed-int4": "w4a16", "compressed-int8": "w8a16", "compressed-fp8": "fp8"}
    return "+".join(label[k] for k in kinds) or "f16"


def _writer(path: Path, st: dict) -> str:
    """The probable tool: llm-compressor (the writer of compressed-tensors checkpoints for vLLM), named with the
    modifiers its recipe.yaml lists when it saved one, and the compressed-tensors version the config records."""
    version = f"compressed-tensors {st['version'][:40]}" if st["version"] else "compressed-tensors"
    try:
        with open(path / "recipe.yaml", encoding="utf-8", errors="replace") as f:
            recipe = f.read(1 << 16)
    except OSError:
        return f"{version} (probably llm-compressor)"
    modifiers = sorted(set(re.findall(r"^\s*(\w{1,40}Modifier):", recipe, re.MULTILINE)))
    return f"llm-compressor ({', '.join(modifiers + [version])})"


register(Layout(METHOD, is_compressed, read))
