"""The `mxtools` command line: one short function per verb. The only place errors become messages and exit
codes: 0 success, 1 a verification verdict failed, 2 bad input or environment."""
from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from pathlib import Path

import click

from . import convert as conv
from .compare import DEFAULT_FORMATS
from .errors import MxError
from .layouts import open_checkpoint, writable
from .layouts.gptq import NAMINGS


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled or timed out), handled as Ctrl-C is: outputs in progress are removed."""


def _terminate(signum, frame):
    raise Terminated()


def handled(fn):
    """Turn library errors, Ctrl-C, SIGTERM and OS errors into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except MxError as exc:
            _fail(exc.line())
        except KeyboardInterrupt as exc:
            _fail(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; nothing was left behind")
        except OSError as exc:
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


def _fail(msg: str):
    one_line = " ".join(line.strip() for line in msg.splitlines())  # a parser's message may span lines
    click.echo(f"mxtools: error: {one_line}", err=True)
    sys.exit(2)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None,
                file=sys.stderr)


@click.group()
@click.version_option(package_name="mxtools")
def main():
    """Convert, quantize and verify Mixtral-8x7B checkpoints (HF, Mistral, GGUF)."""


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--to", "layout", required=True, type=click.Choice(writable()))
@click.option("--outtype", default="auto", show_default=True,
              help="f32|f16|bf16 (all layouts); for gguf also the llama.cpp mixes in recipes/gguf (q8_0, q6_k, "
                   "q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, q5_0, q5_1, q4_0, q4_1); auto keeps "
                   "the source's type")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="importance matrix (ours or llama.cpp's, GGUF or legacy .dat) for block-quantized outtypes")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="gguf mixes, as llama-quantize: tensors whose GGUF name matches REGEX get TYPE (first match wins)")
@click.option("--output-tensor-type", metavar="TYPE", help="gguf mixes: the output matrix's type")
@click.option("--token-embedding-type", metavar="TYPE", help="gguf mixes: the token embedding's type")
@click.option("--pure", is_flag=True, help="gguf mixes: every weight in the mix's default type (llama-quantize --pure)")
@click.option("--shard-size", default="5GB", show_default=True, help="HF shard size")
@click.option("--names", type=click.Choice(list(NAMINGS)),
              help="--to gptq: tensor names for vLLM (default) or transformers 5 / GPTQModel; a GPTQ source is "
                   "re-exported byte for byte under them")
@click.option("--chat-template", default="auto", show_default=True, metavar="auto|keep|mistral-common|FILE",
              help="auto: mistral-common's template where the source's is known to give other token ids")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="replace an existing output")
@handled
def convert(src, layout, outtype, imatrix, tensor_types, output_tensor_type, token_embedding_type, pure, shard_size,
            names, chat_template, out, force):
    """Convert SRC (any layout) to another layout, streaming one tensor at a time."""
    from .chat import set_chat_template
    with open_checkpoint(src) as ckpt:
        note = set_chat_template(ckpt, chat_template) if layout != "mistral" else None  # params.json has none
        resolved = conv.resolve_outtype(ckpt, outtype)
        with _progress_bar(conv.estimate_bytes(ckpt, resolved), f"{layout} {resolved}") as bar:
            conv.write_checkpoint(ckpt, layout, out, outtype, inputs=[src], force=force, progress=bar.update,
                                  shard_bytes=_size(shard_size), imatrix_path=imatrix,
                                  overrides=_overrides(tensor_types, output_tensor_type, token_embedding_type, pure),
                                  **_names(names, layout, ckpt, outtype))
    if note:
        click.echo(note, err=True)
    click.echo(f"wrote {out}")


def _overrides(tensor_types, output_type, token_embd_type, pure):
    """llama-quantize's manual type choices as quant.mixes.Overrides, or None when none is given."""
    if not (tensor_types or output_type or token_embd_type or pure):
        return None
    from .quant.mixes import Overrides, parse_tensor_type, qtype_named
    return Overrides(tuple(parse_tensor_type(t) for t in tensor_types),
                     qtype_named(output_type, "--output-tensor-type") if output_type else None,
                     qtype_named(token_embd_type, "--token-embedding-type") if token_embd_type else None, pure)


def _names(names, layout, ckpt, outtype) -> dict:
    """convert's --names option for the GPTQ writer; a GPTQ re-export keeps every stored dtype."""
    if layout == "gptq" and ckpt.layout == "gptq" and outtype != "auto":
        raise MxError(f"a GPTQ source is re-exported with every tensor as stored: --outtype {outtype} does not "
                      "apply (leave it auto)", file=ckpt.path)
    if names and layout != "gptq":
        raise MxError("--names applies to --to gptq only")
    return {"names": names} if names else {}


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--weights/--no-weights", "scan", default=True, show_default=True,
              help="read every weight once, one tensor at a time, for NaN/inf values and unreadable data")
@handled
def inspect(path, as_json, scan):
    """Layout, config, tensor count, dtypes, sizes, and any problems found (exit 2 when there are any)."""
    from .inspect import describe, render
    report = describe(path, scan)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    problems = report["problems"]
    if problems:
        _fail(problems[0] + (f" (and {len(problems) - 1} more problems listed above)" if len(problems) > 1 else ""))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layout", default="hf", show_default=True, type=click.Choice(writable()))
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "8x7b"]))
@click.option("--layers", type=int)
@click.option("--hidden", type=int, help="model width (dim)")
@click.option("--intermediate", type=int, help="expert FFN width")
@click.option("--heads", type=int)
@click.option("--kv-heads", type=int)
@click.option("--head-dim", type=int)
@click.option("--experts", type=int)
@click.option("--experts-per-tok", type=int)
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["f32", "f16", "bf16"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@handled
def synth(out, layout, preset, layers, hidden, intermediate, heads, kv_heads, head_dim, experts, experts_per_tok,
          dtype, seed, force):
    """Write a random-weight Mixtral with the real Mistral v1 tokenizer, for pipeline tests."""
    from .synth import synth_checkpoint, synth_spec
    from .tensors import FLOAT_DTYPES
    spec = synth_spec(preset, n_layers=layers, dim=hidden, hidden_dim=intermediate, n_heads=heads,
                      n_kv_heads=kv_heads, head_dim=head_dim or (hidden // heads if hidden and heads else None),
                      n_experts=experts, n_experts_per_tok=experts_per_tok)
    ckpt = synth_checkpoint(spec, seed, FLOAT_DTYPES[dtype])
    with _progress_bar(conv.estimate_bytes(ckpt, dtype), f"synth {layout}") as bar:
        conv.write_checkpoint(ckpt, layout, out, dtype, force=force, progress=bar.update)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("candidate", type=click.Path(exists=True, path_type=Path))
@click.option("--reference", type=click.Path(exists=True, path_type=Path), help="the fp16/bf16 reference model")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="evaluation text (default: the bundled held-out text)")
@click.option("--ctx", default=512, show_default=True)
@click.option("--chunks", type=int, help="evaluate only the first N chunks")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the full report here")
@click.option("--outtype", help="which default thresholds apply (default: guessed from the candidate)")
@click.option("--max-kld", type=float)
@click.option("--min-same-top", type=float)
@click.option("--max-ppl-ratio", type=float)
@click.option("--save-base", type=click.Path(path_type=Path), help="save the reference's log-probs for reuse")
@click.option("--base", type=click.Path(exists=True, path_type=Path), help="compare with saved log-probs")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--dtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16"]))
@click.option("--plot", type=click.Path(path_type=Path), help="draw per-layer error and KLD histogram (PNG)")
@handled
def verify(candidate, reference, text, ctx, chunks, json_out, outtype, max_kld, min_same_top, max_ppl_ratio,
           save_base, base, device, dtype, plot):
    """Check CANDIDATE against a reference: perplexity, KL divergence, per-layer parity. Exit 0 pass, 1 fail."""
    from .verify_cli import run_verify
    overrides = {k: v for k, v in (("max_kld_mean", max_kld), ("min_same_top_p", min_same_top),
                                   ("max_ppl_ratio", max_ppl_ratio)) if v is not None}
    report = run_verify(candidate, reference, text=text, ctx=ctx, chunks=chunks, outtype=outtype,
                        overrides=overrides, save_base=save_base, base=base, device=device, dtype=dtype,
                        json_out=json_out, plot=plot)
    click.echo(report["_text"])
    if not report["passed"]:
        click.echo(f"mxtools: verification failed: {', '.join(report['failures'])}", err=True)
        sys.exit(1)


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="calibration text (default: the bundled calibration text)")
@click.option("--ctx", default=512, show_default=True)
@click.option("--chunks", type=int, help="use only the first N chunks")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True)
@handled
def imatrix(model_path, text, ctx, chunks, device, out, force):
    """Importance matrix (mean squared input activation per column, per expert over its routed tokens), in the
    GGUF imatrix format current llama.cpp reads."""
    from .bundled import CALIB
    from .imatrix_cli import imatrix_from_text
    imatrix_from_text(model_path, text or CALIB, out, ctx=ctx, chunks=chunks, device=device, force=force)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--to", "target", default="gptq", show_default=True, type=click.Choice(["gptq", "gguf"]),
              help="gptq: a GPTQ v1 checkpoint (HF layout); gguf: one GGUF file in a llama.cpp mix (--outtype), "
                   "GPTQ on llama.cpp's own block grids")
@click.option("--outtype", help="--to gguf: the llama.cpp mix (q4_k_m, q3_k_m, q2_k, ... as in recipes/gguf)")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--to gguf: an importance matrix; weights ggml's scale searches instead of the Hessian "
                   "diagonal, and selects llama.cpp's imatrix type choices")
@click.option("--bits", type=click.Choice(["2", "4", "8"]), help="default 4 (or the recipe's)")
@click.option("--method", type=click.Choice(["gptq", "rtn"]))
@click.option("--group-size", type=int, help="columns per scale; -1 for one group per row (default 128)")
@click.option("--sym/--asym", default=None, help="symmetric (default; what vLLM's Marlin kernels need) or not")
@click.option("--act-order", is_flag=True, default=None,
              help="process columns by decreasing Hessian diagonal (g_idx not monotone; default: group-aware order)")
@click.option("--damp", type=float, help="damping, a fraction of the mean Hessian diagonal (default 0.05)")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="calibration text (default: the bundled calibration text)")
@click.option("--nsamples", type=int, help="calibration sequences (default 128)")
@click.option("--seqlen", type=int, help="tokens per calibration sequence (default 2048)")
@click.option("--experts", type=click.Choice(["routed", "all"]),
              help="each expert's Hessian from its routed tokens (default) or from every token")
@click.option("--min-tokens", type=int, help="an expert matrix with fewer calibration tokens falls back to RTN "
              "(default: 10% of its input width)")
@click.option("--gptaq", type=float, metavar="ALPHA",
              help="the asymmetric objective (GPTAQ): layers also correct the error of the quantized layers before "
                   "them, ALPHA of the least-squares correction (0 off, the default; 1 whole). Costs a second, "
                   "unquantized forward stream; on the bundled model it helps --to gguf's low-bit mixes most")
@click.option("--recipe", help="a named recipe in recipes/ (e.g. gptq-int4-g128) or a YAML file")
@click.option("--names", default="vllm", show_default=True, type=click.Choice(list(NAMINGS)),
              help="tensor names: vLLM's (block_sparse_moe.experts.E.w1) or transformers 5's, which GPTQModel "
                   "loads (mlp.experts.E.gate_proj)")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True)
@handled
def quantize(src, target, outtype, imatrix, bits, method, group_size, sym, act_order, damp, calib, nsamples, seqlen,
             experts, min_tokens, gptaq, recipe, names, device, out, force):
    """GPTQ (or RTN) of every Linear, layer by layer; writes a GPTQ v1 checkpoint (HF layout), or with --to gguf
    a GGUF in a llama.cpp mix."""
    if target == "gguf":
        return _quantize_gguf(src, outtype, imatrix, method, damp, calib, nsamples, seqlen, experts, min_tokens,
                              gptaq, device, out, force, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                              recipe=recipe)
    if outtype or imatrix:
        raise MxError("--outtype and --imatrix apply to --to gguf")
    from .bundled import CALIB
    from .quantize import run_quantize, summary
    options = {k: v for k, v in dict(bits=int(bits) if bits else None, method=method, group_size=group_size,
                                     sym=sym, act_order=act_order, damp=damp, nsamples=nsamples, seqlen=seqlen,
                                     experts=experts, min_tokens=min_tokens, asym=gptaq).items() if v is not None}
    report = run_quantize(src, out, calib_text_path=calib or CALIB, device=device, recipe=recipe, force=force, names=names,
                          **options)
    click.echo(summary(report))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option("--formats", "fmts", metavar="F1,F2,...",
              help=f"candidate formats (default {','.join(DEFAULT_FORMATS)}); also every GGUF mix (+imatrix, +gptq; "
                   "the i-quant mixes +imatrix, some also alone), gptq-int8, rtn-int8, bnb-fp4")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="calibration text for GPTQ and the imatrix (default: the bundled calibration text)")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="evaluation text (default: the bundled held-out text)")
@click.option("--chunks", type=int, help="evaluate only the first N chunks")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the rows here")
@click.option("--plot", type=click.Path(path_type=Path), help="draw mean KLD against bits per weight (PNG)")
@click.option("--keep", type=click.Path(path_type=Path), help="build the candidates in this new directory, keep them")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@handled
def compare(model_path, fmts, calib, text, chunks, json_out, plot, keep, device):
    """Build every candidate format from MODEL, verify each against MODEL, print one table sorted by size."""
    from .compare import render, run_compare
    result = run_compare(model_path, fmts=fmts, calib=calib, text=text, chunks=chunks, device=device, keep=keep,
                         json_out=json_out, plot=plot, progress=lambda msg: click.echo(msg, err=True))
    click.echo(render(result))


def _quantize_gguf(src, outtype, imatrix, method, damp, calib, nsamples, seqlen, experts, min_tokens, gptaq, device,
                   out, force, **int_only):
    from .quantize import run_quantize_gguf, summary
    given = sorted(k.replace("_", "-") for k, v in int_only.items() if v is not None)
    if given:
        raise MxError(f"--{', --'.join(given)} apply to --to gptq; --to gguf takes the mix's own grids (--outtype)")
    if not outtype:
        raise MxError("--to gguf needs --outtype (a llama.cpp mix such as q4_k_m)")
    options = {k: v for k, v in dict(method=method, damp=damp, nsamples=nsamples, seqlen=seqlen, experts=experts,
                                     min_tokens=min_tokens, asym=gptaq).items() if v is not None}
    report = run_quantize_gguf(src, out, outtype.lower(), calib_text_path=calib, imatrix_path=imatrix,
                               device=device, force=force, **options)
    click.echo(summary(report))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True)
@handled
def example(out, force):
    """Write the bundled tiny trained Mixtral to OUT/model with OUT/calib.txt and OUT/eval.txt."""
    from .bundled import write_example
    write_example(out, force)
    click.echo(f"wrote {out}/model, {out}/calib.txt, {out}/eval.txt")


if __name__ == "__main__":
    main()
