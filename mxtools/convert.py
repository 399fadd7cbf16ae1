"""convert: any readable layout -> any writable layout, streamed, written atomically."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import MxError
from .io.atomic import atomic_output, check_output
from .layouts import REGISTRY, open_checkpoint
from .tensors import FLOAT_DTYPES, Checkpoint

GGUF_FLOAT_OUTTYPES = ("f32", "f16", "bf16")


def resolve_outtype(ckpt: Checkpoint, requested: str) -> str:
    """'auto' keeps the source's float type (f32 for block-quantized sources, whose values f32 holds exactly)."""
    if requested != "auto":
        return requested
    by_dtype = {v: k for k, v in FLOAT_DTYPES.items()}
    t = next(iter(ckpt.tensors.values()))
    main = ckpt.main_dtype()
    return "f32" if t.stored_as or main not in by_dtype else by_dtype[main]


def outtypes(layout: str) -> tuple[str, ...]:
    """Float types everywhere; in GGUF also every llama.cpp mix in recipes/gguf (q8_0, q4_k_m, ...)."""
    from .quant.mixes import MIXES
    return GGUF_FLOAT_OUTTYPES + tuple(MIXES) if layout == "gguf" else tuple(FLOAT_DTYPES)


def gguf_mix_options(ckpt: Checkpoint, outtype: str, imatrix=None) -> dict:
    """Writer options (per-tensor type policy, file type, importance matrix) for a GGUF mix; {} for floats."""
    from .quant.mixes import MIXES, gguf_options
    if outtype not in MIXES:
        if imatrix:
            raise MxError(f"--imatrix applies to block-quantized outtypes, not {outtype}")
        return {}
    from .quant.imatrix import imatrix_for_writer, read_imatrix
    if not imatrix:
        return gguf_options(outtype, ckpt.spec, None)
    raw = read_imatrix(imatrix)
    options = gguf_options(outtype, ckpt.spec, imatrix_for_writer(raw, ckpt.spec))
    return {**options, "extra_metadata": raw.quantize_metadata(imatrix)}


def rtn_gptq_options(ckpt: Checkpoint) -> dict:
    """GPTQ writer options that round every Linear of a float checkpoint to nearest, int4 g128 (calibrated GPTQ
    is `mxtools quantize`)."""
    from .quant.gptq import QuantConfig
    from .quant.gptq_pipeline import quantize_checkpoint
    cfg = QuantConfig()
    return {"stream": quantize_checkpoint(ckpt, None, cfg, "rtn"), "settings": cfg}


def write_checkpoint(ckpt: Checkpoint, layout: str, out: Path, outtype: str, *, inputs=(), force=False,
                     progress=lambda n: None, **options) -> Path:
    """Write `ckpt` in `layout` under a temporary name, renamed to `out` only when complete. `inputs`: the files
    or folders it is made from, which the output may neither replace nor sit inside."""
    lay = REGISTRY[layout]
    if lay.write is None:
        raise MxError(f"layout {layout} is read-only")
    outtype = resolve_outtype(ckpt, outtype)
    if outtype not in outtypes(layout):
        raise MxError(f"--outtype {outtype} is not available for --to {layout} (choose from "
                      f"{', '.join(outtypes(layout))})")
    imatrix_path = options.pop("imatrix_path", None)
    if layout == "gguf" and "policy" not in options:  # callers may pass their own policy (overrides)
        options.update(gguf_mix_options(ckpt, outtype, imatrix_path))
    check_output(out, list(inputs), force)
    if layout == "gptq" and ckpt.layout != "gptq":  # a float source: round to nearest, int4 g128
        options.update(rtn_gptq_options(ckpt))
    with atomic_output(out, lay.output_is_dir, force=force) as tmp:
        lay.write(ckpt, tmp, outtype, progress, **options)
    return Path(out)


def convert(src, layout: str, out, outtype: str = "auto", *, force: bool = False, progress=lambda n: None,
            **options) -> Path:
    with open_checkpoint(src) as ckpt:
        return write_checkpoint(ckpt, layout, Path(out), outtype, inputs=[Path(src)], force=force, progress=progress,
                                **options)


def estimate_bytes(ckpt: Checkpoint, outtype: str) -> int:
    """Rough output size, for progress bars."""
    per = {"f32": 4, "f16": 2, "bf16": 2}.get(outtype, 0.7)
    return int(sum(torch.Size(t.shape).numel() for t in ckpt.tensors.values()) * per)
