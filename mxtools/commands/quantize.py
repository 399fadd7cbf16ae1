"""`mxtools quantize`: calibrate and quantize a checkpoint, written as a GPTQ v1 directory or, with --to gguf, as a
GGUF in one of llama.cpp's mixes with GPTQ on its block grids.

This verb wires the pieces and owns the settings: the named recipes (mxtools/recipes) and DEFAULTS resolve into
the options the algorithms take; the reader (layouts.open_checkpoint) feeds the layer-by-layer pipeline
(quant/gptq_pipeline), whose per-Linear results go to a writer (layouts/gptq, or layouts/gguf through
quant/gguf_quantize's hooks) inside one atomic output.
"""
from __future__ import annotations

import logging
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import recipes
from ..core.defaults import CALIB, GPTQ_NAMINGS, QUANTIZE
from ..core.errors import MxError
from ..core.tensors import Checkpoint
from ..io.atomic import atomic_output, check_output
from ..layouts.gptq import write_quantized
from ..quant.gguf_iq import IQ_GPTAQ, IQ_TYPES
from ..quant.gguf_quantize import LayerBytes, MatrixQuantizer, metadata
from ..quant.gguf_tune import tuned_by_default
from ..quant.gptq import QuantConfig
from ..quant.gptq_pipeline import Progress, quantize_checkpoint, totals
from ..quant.gptq_tune import TuneConfig
from ..quant.imatrix import imatrix_for_writer, read_imatrix
from ..quant.mixes import MIXES, gguf_options, load_mix, read_yaml
from .convert import write_checkpoint
from .inputs import open_model

# ---------------------------------------------------------------- recipes and defaults

RECIPE_KEYS = ("bits", "method", "group_size", "sym", "act_order", "damp", "nsamples", "seqlen", "experts",
               "static_groups", "mse", "min_tokens", "act_group_aware", "search", "refit", "repass", "sweeps",
               "gptaq", "gptaq_ridge", "tune_iters", "tune_scales", "tune_codes")


RENAMED_KEYS = {"asym": "gptaq", "asym_ridge": "gptaq_ridge"}  # old name -> new (GPTAQ's share is no grid's asym)
RECIPE_CHOICES = {"method": ("gptq", "rtn"), "experts": ("routed", "all")}
RECIPE_MIN = {"nsamples": 1, "seqlen": 2, "min_tokens": 0, "tune_iters": 0}  # integer settings outside QuantConfig
MAX_SETTING = 2**31 - 1


def load_recipe(name_or_path) -> dict:
    """A recipe's settings as a dict: a path to a YAML file, or a name under recipes/ ("gptq-int4-g128").
    Each value must have its default's type (a null only where the default is one); anything else is an
    MxError naming the file."""
    path = recipes.find(name_or_path)
    if path is None:
        raise MxError(f"no recipe {name_or_path!r} (known: {', '.join(recipes.names())})")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise MxError(f"a recipe is a mapping of settings, not {type(data).__name__}", file=path)
    for old, key in RENAMED_KEYS.items():
        if old in data:
            if key in data:
                raise MxError(f"recipe gives {key} and its old name {old}; keep {key}", file=path)
            logging.getLogger("mxtools").warning(f"{path}: recipe key {old} is deprecated and goes in the next "
                                                 f"release; use {key}")
            data[key] = data.pop(old)
    unknown = set(data) - set(RECIPE_KEYS) - {"name", "description"}
    if unknown:
        raise MxError(f"recipe has unknown keys {sorted(map(reprlib.repr, unknown))}; known: {', '.join(RECIPE_KEYS)}",
                      file=path)
    for key, value in data.items():
        _check_setting(key, value, path)
    try:
        QuantConfig(**{k: v for k, v in {**DEFAULTS, **data}.items() if k in QuantConfig.__dataclass_fields__})
    except ValueError as exc:
        raise MxError(str(exc), file=path) from None
    return data


def _check_setting(key: str, value, path) -> None:
    default = DEFAULTS.get(key, "")  # name, description: text
    kind = float if isinstance(default, float) else int if default is None else type(default)
    fits = (value is None and default is None) or (
        isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool)))
    if not fits:
        raise MxError(f"recipe value {key}: {reprlib.repr(value)} is not {kind.__name__}"
                      f"{' or null' if default is None else ''}", file=path)
    if kind is int and value is not None and not RECIPE_MIN.get(key, -1) <= value <= MAX_SETTING:
        raise MxError(f"recipe value {key}: {value} is out of range", file=path)
    if key in RECIPE_CHOICES and value not in RECIPE_CHOICES[key]:
        raise MxError(f"recipe value {key}: {value!r} is not one of {', '.join(RECIPE_CHOICES[key])}", file=path)


DEFAULTS = QUANTIZE


def resolve_settings(recipe=None, **given) -> dict:
    """DEFAULTS, then the recipe, then every option the caller gave (not None) on top."""
    settings = dict(DEFAULTS)
    if recipe:
        settings.update({k: v for k, v in load_recipe(recipe).items() if k in RECIPE_KEYS})
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def quant_config(settings: dict) -> QuantConfig:
    """The QuantConfig of resolved settings; its refusals become MxErrors."""
    try:
        return QuantConfig(**{k: v for k, v in settings.items() if k in QuantConfig.__dataclass_fields__})
    except ValueError as exc:
        raise MxError(str(exc)) from None


@dataclass(frozen=True)
class QuantizeSettings:
    """`mxtools quantize`'s options. The algorithm's settings left None come from the recipe (if any), else
    core.defaults.QUANTIZE; `gptaq` is the asymmetric objective's share (--gptaq)."""

    recipe: str | None = None
    calib: Path | None = None  # the calibration text (default: the bundled one)
    tokenizer: Path | None = None  # for a checkpoint without one (default: the Mixtral v1 tokenizer)
    device: str = "auto"
    force: bool = False
    names: str = GPTQ_NAMINGS[0]  # --to gptq: the tensor naming
    bits: int | None = None
    method: str | None = None
    group_size: int | None = None
    sym: bool | None = None
    act_order: bool | None = None
    damp: float | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    experts: str | None = None
    min_tokens: int | None = None
    gptaq: float | None = None
    gptaq_ridge: float | None = None
    tune_iters: int | None = None  # block-output reconstruction after GPTQ: iterations per layer (0: off)
    tune_scales: bool | None = None  # ... tuning the group scales
    tune_codes: bool | None = None  # ... tuning the codes (rounding offsets)

    def resolved(self) -> dict:
        return resolve_settings(self.recipe, **{k: getattr(self, k) for k in GIVEN_KEYS})


GIVEN_KEYS = ("bits", "method", "group_size", "sym", "act_order", "damp", "nsamples", "seqlen", "experts",
              "min_tokens", "gptaq", "gptaq_ridge", "tune_iters", "tune_scales", "tune_codes")
GPTQ_ONLY_KEYS = ("bits", "group_size", "sym", "act_order", "recipe")  # the int grid's; --to gguf has the mix's


def calibration_tokens(ckpt: Checkpoint, path) -> list[int]:
    """The calibration text tokenized with the checkpoint's tokenizer, no BOS."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MxError(f"cannot read the calibration text: {exc}", file=path) from None
    return ckpt.tokenizer.encode(text, bos=False)


# ---------------------------------------------------------------- --to gptq

def run_quantize(src, out, settings: QuantizeSettings = QuantizeSettings(),
                 progress: Progress | None = None) -> dict:
    """Open src, calibrate on the text, write a GPTQ v1 directory at out atomically, its tensors named for
    `settings.names` (layouts.gptq.NAMINGS). Returns the report (also written to out/quantize_report.json) with
    "timings"."""
    s = settings.resolved()
    cfg = quant_config(s)
    check_output(Path(out), [Path(src)], settings.force)
    with open_model(src, settings.tokenizer) as ckpt:
        tokens = calibration_tokens(ckpt, settings.calib or CALIB) if s["method"] == "gptq" else None
        stream = quantize_checkpoint(ckpt, tokens, cfg, s["method"], s["experts"], s["nsamples"], s["seqlen"],
                                     settings.device, s["min_tokens"], progress, gptaq=s["gptaq"],
                                     gptaq_ridge=s["gptaq_ridge"],
                                     tune=TuneConfig(iters=s["tune_iters"], scales=s["tune_scales"],
                                                     codes=s["tune_codes"]))
        stream.report["source"] = str(src)
        stream.report["recipe"] = str(settings.recipe) if settings.recipe else None
        with atomic_output(Path(out), directory=True, force=settings.force) as tmp:
            write_quantized(ckpt, tmp, stream, cfg, source_name=str(src), names=settings.names)
    return {**stream.report, "timings": stream.timings}


# ---------------------------------------------------------------- --to gguf

def run_quantize_gguf(src, out, outtype: str | None, settings: QuantizeSettings = QuantizeSettings(),
                      imatrix_path=None, progress: Progress | None = None, iq_options: dict | None = None,
                      embedding: bool = True) -> dict:
    """Quantize src to the llama.cpp mix `outtype` with GPTQ on its block grids and codebooks (quant/gguf_quantize);
    write one GGUF at out atomically. Returns the pipeline's report with "timings".

    A mix with i-quant types takes the types llama.cpp's mix gives with an importance matrix (GPTQ's Hessian plays
    its role) and the asymmetric objective at gguf_iq.IQ_GPTAQ unless --gptaq is given. Block-output
    reconstruction runs by default only on mixes of at most gguf_tune.TUNED_MAX_BPW bits per weight (their default
    type's), on any mix with --tune-iters. iq_options: GGML type ->
    quantize_matrix's i-quant options, over gguf_iq.IQ_OPTIONS; embedding=False leaves the token embedding as
    llama.cpp encodes it (no GPTQ)."""
    given = sorted(k.replace("_", "-") for k in GPTQ_ONLY_KEYS if getattr(settings, k) is not None)
    if given:
        raise MxError(f"--{', --'.join(given)} apply to --to gptq; --to gguf takes the mix's own grids (--outtype)")
    if not outtype:
        raise MxError("--to gguf needs --outtype (a llama.cpp mix such as q4_k_m)")
    outtype = outtype.lower()
    if outtype not in MIXES:
        raise MxError(f"--to gguf wants a block-quantized mix as --outtype ({', '.join(MIXES)}), got {outtype!r}")
    s = settings.resolved()
    method, experts, damp = s["method"], s["experts"], s["damp"]
    cfg = quant_config({"damp": damp})  # its checks are the option's
    calib = Path(settings.calib or CALIB)
    with open_model(src, settings.tokenizer) as ckpt:
        raw = read_imatrix(imatrix_path) if imatrix_path else None
        mix = load_mix(outtype)
        importance = method == "gptq" and bool(mix.types() & set(IQ_TYPES))
        gptaq = IQ_GPTAQ if importance and settings.gptaq is None else s["gptaq"]
        opts = gguf_options(outtype, ckpt.spec, imatrix_for_writer(raw, ckpt.spec) if raw else None,
                            importance=importance)
        tokens = calibration_tokens(ckpt, calib) if method == "gptq" else None
        hook = MatrixQuantizer(ckpt.spec, opts["policy"], opts["imatrix"], damp, iq_options)
        tuned = settings.tune_iters is not None or tuned_by_default(mix.default)
        tune = TuneConfig(s["tune_iters"] if method == "gptq" and tuned else 0)
        stream = quantize_checkpoint(ckpt, tokens, cfg, method, experts, s["nsamples"], s["seqlen"],
                                     settings.device, s["min_tokens"], progress=progress, quantizer=hook,
                                     gptaq=gptaq, gptaq_ridge=s["gptaq_ridge"], tune=tune)
        for key in ("bits", "group_size", "sym", "act_order", "static_groups", "tune_scales", "tune_codes"):
            stream.report.pop(key, None)  # the int GPTQ's settings
        stream.report.update(source=str(src), outtype=outtype, imatrix=str(imatrix_path) if raw else None)
        info = stream.report["calibration"]
        extra = metadata(method, calib, info, damp, experts, gptaq,
                         tune.iters if tune.runs_on(info.get("samples", 0)) else 0)
        extra += raw.quantize_metadata(imatrix_path) if raw else []
        source = LayerBytes(stream, hook, embedding)
        write_checkpoint(ckpt, "gguf", Path(out), outtype, inputs=[Path(src)], force=settings.force, **opts,
                         extra_metadata=extra, encoded=source)
        source.finish()
    return {**stream.report, "timings": stream.timings}


# ---------------------------------------------------------------- the terminal summary

def summary(report: dict) -> str:
    """A few lines for the terminal: settings, calibration, methods used, fallbacks, time (`report["timings"]`,
    as run_quantize and run_quantize_gguf return it)."""
    t, cal, times = report.get("totals") or totals(report["layers"]), report.get("calibration", {}), \
        report.get("timings", {})
    per_layer = float(np.mean(times["layers_s"])) if times.get("layers_s") else 0.0
    if "outtype" in report:
        head = f"{report['outtype']} ({report['method']}), experts {report['experts']}, damp {report['damp']}"
    else:
        head = (f"{report['method']} int{report['bits']} g{report['group_size']} "
                f"{'sym' if report['sym'] else 'gptaq'}{' act-order' if report['act_order'] else ''}, "
                f"experts {report['experts']}")
    lines = [f"{head}, device {report['device']}",
             f"calibration: {cal.get('samples', 0)} samples of {cal.get('seqlen', '-')} tokens"
             + (f" (fewer than the {cal['requested']} asked: the text is short)" if cal.get("short") else ""),
             (f"linears: {t.get('linears')} ({t.get('gptq')} gptq, {t.get('rtn')} rtn); tokens per expert "
              f"{t.get('expert_tokens_min')}..{t.get('expert_tokens_max')}; {times.get('time_s')} s "
              f"({per_layer:.3f} s per layer)")]
    if t.get("experts_rtn"):
        lines.append(f"  experts rounded to nearest (too few tokens or GPTQ failed): {', '.join(t['experts_rtn'])}")
    lines += [f"  rtn fallback: {f}" for f in t.get("fallbacks", []) if " expert " not in f]
    lines += [f"  damping raised: {d}" for d in t.get("damp_raised", [])]
    tuned = [lay["tune"] for lay in report.get("layers", []) if "tune" in lay]
    if tuned:
        kept, skipped = sum(bool(x.get("kept")) for x in tuned), sum("skipped" in x for x in tuned)
        lines.append(f"block-output reconstruction: {kept} of {len(tuned)} layers kept their tuned scales"
                     + (f" ({skipped} skipped: too few calibration samples)" if skipped else ""))
    return "\n".join(lines)
