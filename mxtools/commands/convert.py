"""convert: any readable layout -> any writable layout, streamed, written atomically."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..core.defaults import SHARD_BYTES
from ..core.errors import MxError
from ..core.tensors import FLOAT_DTYPES, Checkpoint
from ..io.atomic import atomic_output, check_output
from ..layouts import REGISTRY, WriteOptions, no_progress, open_checkpoint

GGUF_FLOAT_OUTTYPES = ("f32", "f16", "bf16")


def resolve_outtype(ckpt: Checkpoint, requested: str) -> str:
    """'auto' keeps the source's float type (f32 for sources with any quantized tensor, whose values f32 holds
    exactly)."""
    if requested != "auto":
        return requested
    by_dtype = {v: k for k, v in FLOAT_DTYPES.items()}
    main = ckpt.main_dtype()
    return "f32" if any(t.stored_as for t in ckpt.tensors.values()) or main not in by_dtype else by_dtype[main]


def outtypes(layout: str) -> tuple[str, ...]:
    """Float types everywhere; in GGUF also every llama.cpp mix in recipes/gguf (q8_0, q4_k_m, ...)."""
    from ..quant.mixes import MIXES
    return GGUF_FLOAT_OUTTYPES + tuple(MIXES) if layout == "gguf" else tuple(FLOAT_DTYPES)


def gguf_mix_options(ckpt: Checkpoint, outtype: str, imatrix=None, overrides=None) -> dict:
    """Writer options (per-tensor type policy, file type, importance matrix, its metadata) for a GGUF mix,
    with llama-quantize's manual `overrides` (quant.mixes.Overrides); {} for floats."""
    from ..quant.mixes import MIXES, gguf_options
    if outtype not in MIXES:
        if imatrix or overrides:
            raise MxError(f"--imatrix and the tensor type options apply to block-quantized outtypes, not {outtype}")
        return {}
    from ..quant.imatrix import imatrix_for_writer, read_imatrix
    if not imatrix:
        return gguf_options(outtype, ckpt.spec, None, overrides)
    raw = read_imatrix(imatrix)
    options = gguf_options(outtype, ckpt.spec, imatrix_for_writer(raw, ckpt.spec), overrides)
    return {**options, "extra_metadata": tuple(raw.quantize_metadata(imatrix))}


def rtn_gptq_options(ckpt: Checkpoint) -> dict:
    """GPTQ writer options that round every Linear of a float checkpoint to nearest, int4 g128 (calibrated GPTQ
    is `mxtools quantize`)."""
    from ..quant.gptq import QuantConfig
    from ..quant.gptq_pipeline import quantize_checkpoint
    cfg = QuantConfig()
    return {"stream": quantize_checkpoint(ckpt, None, cfg, "rtn"), "settings": cfg}


def write_checkpoint(ckpt: Checkpoint, layout: str, out: Path, outtype: str, *, inputs=(), force=False,
                     progress=no_progress, shard_bytes: int = SHARD_BYTES, imatrix_path=None,
                     names: str | None = None, overrides=None, policy=None, file_type: int | None = None,
                     imatrix: dict | None = None, extra_metadata=(), encoded=None) -> Path:
    """Write `ckpt` in `layout` under a temporary name, renamed to `out` only when complete. `inputs`: the files
    or folders it is made from, which the output may neither replace nor sit inside.

    The options are layouts.WriteOptions'. A GGUF mix without a `policy` gets the mix's own (with `imatrix_path`
    read as its importance matrix, and llama-quantize's manual `overrides`); a float checkpoint written as GPTQ is
    rounded to nearest, int4 g128."""
    lay = REGISTRY[layout]
    if lay.write is None:
        raise MxError(f"layout {layout} is read-only")
    outtype = resolve_outtype(ckpt, outtype)
    if outtype not in outtypes(layout):
        raise MxError(f"--outtype {outtype} is not available for --to {layout} (choose from "
                      f"{', '.join(outtypes(layout))})")
    opts = WriteOptions(outtype, progress, shard_bytes, policy, file_type, imatrix, tuple(extra_metadata), encoded,
                        names=names)
    if layout == "gguf" and policy is None:
        opts = replace(opts, **gguf_mix_options(ckpt, outtype, imatrix_path, overrides))
    elif overrides:
        raise MxError("the tensor type options apply to --to gguf")
    check_output(out, list(inputs), force)
    if layout == "gptq" and ckpt.layout != "gptq":
        opts = replace(opts, **rtn_gptq_options(ckpt))
    with atomic_output(out, lay.output_is_dir, force=force) as tmp:
        lay.write(ckpt, tmp, opts)
    return Path(out)


def convert(src, layout: str, out, outtype: str = "auto", *, force: bool = False, progress=no_progress,
            **options) -> Path:
    """Open src and `write_checkpoint` it; `options` are write_checkpoint's."""
    with open_checkpoint(src) as ckpt:
        return write_checkpoint(ckpt, layout, Path(out), outtype, inputs=[Path(src)], force=force, progress=progress,
                                **options)


def estimate_bytes(ckpt: Checkpoint, outtype: str) -> int:
    """Rough output size, for progress bars."""
    per = {"f32": 4, "f16": 2, "bf16": 2}.get(outtype, 0.7)
    return int(sum(torch.Size(t.shape).numel() for t in ckpt.tensors.values()) * per)


@dataclass(frozen=True)
class ConvertSettings:
    """`mxtools convert`'s options, as the command line gives them."""

    layout: str  # --to
    outtype: str = "auto"
    imatrix: Path | None = None
    tensor_types: tuple[str, ...] = ()  # llama-quantize's --tensor-type REGEX=TYPE
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    shard_bytes: int = SHARD_BYTES
    names: str | None = None  # --to gptq: the tensor naming
    chat_template: str = "auto"
    force: bool = False
    tokenizer: Path | None = None  # for a source without one (default: the Mixtral v1 tokenizer, said)


def run_convert(src, out, s: ConvertSettings, progress_bar: Callable | None = None) -> list[str]:
    """`mxtools convert`: open src, write it in `s.layout` at out; returns the notes for the user (a replaced chat
    template). `progress_bar(total_bytes, label)` gives a context manager with `update(n)`."""
    from ..core.chat import set_chat_template
    from .inputs import open_model
    with open_model(src, s.tokenizer) as ckpt:
        note = set_chat_template(ckpt, s.chat_template) if s.layout != "mistral" else None  # params.json has none
        resolved = resolve_outtype(ckpt, s.outtype)
        notes = [n for n in (note, requantize_note(ckpt, s.layout, resolved, src)) if n]
        overrides = _overrides(s)
        names = _names(s, ckpt)
        bar = progress_bar(estimate_bytes(ckpt, resolved), f"{s.layout} {resolved}") if progress_bar else None
        with bar or _NoBar() as b:
            write_checkpoint(ckpt, s.layout, Path(out), s.outtype, inputs=[Path(src)], force=s.force,
                             progress=b.update, shard_bytes=s.shard_bytes, imatrix_path=s.imatrix,
                             overrides=overrides, **names)
    return notes


def requantize_note(ckpt: Checkpoint, layout: str, outtype: str, src) -> str | None:
    """What to tell the user when a quantized output is made from weights that are already quantized (GPTQ,
    compressed-tensors, bitsandbytes, GGUF block types): they are dequantized and quantized again, so the
    output carries both roundings. None otherwise."""
    from ..quant.mixes import MIXES
    kinds = sorted({t.stored_as for t in ckpt.tensors.values() if t.stored_as})
    quantizing = (layout == "gguf" and outtype in MIXES) or (layout == "gptq" and ckpt.layout != "gptq")
    if not kinds or not quantizing:
        return None
    what = f"--to gguf --outtype {outtype}" if layout == "gguf" else "--to gptq"
    return (f"note: {src} holds already-quantized weights ({', '.join(kinds[:4])}); {what} re-quantizes them "
            "(dequantized to float first), so the output carries both roundings")


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _overrides(s: ConvertSettings):
    """llama-quantize's manual type choices as quant.mixes.Overrides, or None when none is given."""
    if not (s.tensor_types or s.output_tensor_type or s.token_embedding_type or s.pure):
        return None
    from ..quant.mixes import Overrides, parse_tensor_type, qtype_named
    return Overrides(tuple(parse_tensor_type(t) for t in s.tensor_types),
                     qtype_named(s.output_tensor_type, "--output-tensor-type") if s.output_tensor_type else None,
                     qtype_named(s.token_embedding_type, "--token-embedding-type") if s.token_embedding_type else None,
                     s.pure)


def _names(s: ConvertSettings, ckpt: Checkpoint) -> dict:
    """convert's --names option for the GPTQ writer; a GPTQ re-export keeps every stored dtype."""
    if s.layout == "gptq" and ckpt.layout == "gptq" and s.outtype != "auto":
        raise MxError(f"a GPTQ source is re-exported with every tensor as stored: --outtype {s.outtype} does not "
                      "apply (leave it auto)", file=ckpt.path)
    if s.names and s.layout != "gptq":
        raise MxError("--names applies to --to gptq only")
    return {"names": s.names} if s.names else {}
