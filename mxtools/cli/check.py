"""The verbs that judge checkpoints: verify (exit 1 when its verdict fails), compare, inspect."""
from __future__ import annotations

import sys

import click

from ..core.defaults import COMPARE_FORMATS, CTX
from . import main
from .exits import VERDICT_FAILED, fail
from .params import (
    InputPath,
    OutputPath,
    Verb,
    deprecated,
    device_option,
    force_option,
    json_option,
    tokenizer_option,
    write_json,
)


@main.command(cls=Verb, epilog="Example: mxtools verify model-q4_k_m.gguf --reference ex/model --json report.json")
@click.argument("candidate", type=InputPath())
@click.option("--reference", type=InputPath(), help="the fp16/bf16 reference model")
@click.option("--text", type=InputPath(dir_okay=False), multiple=True,
              help="evaluation text; repeat for several (default: both bundled held-out texts, Wikipedia and fiction; "
                   "the verdict fails when any text fails)")
@click.option("--ctx", default=CTX, show_default=True, help="tokens per chunk")
@click.option("--chunks", type=int, help="evaluate only the first N chunks")
@json_option("the full report")
@click.option("--thresholds-for", metavar="TYPE",
              help="which default thresholds apply, by output type (default: guessed from the candidate)")
@click.option("--outtype", "outtype_old", hidden=True, help="old spelling of --thresholds-for")
@click.option("--max-kld", type=float, help="fail when the mean KL divergence is above this")
@click.option("--min-same-top", type=float, help="fail when the share of same top tokens is below this")
@click.option("--max-ppl-ratio", type=float, help="fail when PPL(candidate) / PPL(reference) is above this")
@click.option("--save-base", type=OutputPath(), metavar="FILE", multiple=True,
              help="save the reference's log-probs for reuse (one per text, in the texts' order)")
@click.option("--base", type=InputPath(dir_okay=False), metavar="FILE", multiple=True,
              help="compare with saved log-probs (one per text, in the texts' order)")
@device_option()
@click.option("--dtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16"]),
              help="the type the forward pass computes in")
@click.option("--plot", type=OutputPath(), metavar="FILE", help="draw per-layer error and KLD histogram (PNG)")
@tokenizer_option()
@force_option()
def verify(candidate, reference, text, ctx, chunks, json_out, thresholds_for, outtype_old, max_kld, min_same_top,
           max_ppl_ratio, save_base, base, device, dtype, plot, tokenizer, force):
    """Check CANDIDATE against a reference: perplexity, KL divergence, per-layer parity. Exit 0 pass, 1 fail."""
    from ..commands.verify import VerifySettings, run_verify
    overrides = {k: v for k, v in (("max_kld_mean", max_kld), ("min_same_top_p", min_same_top),
                                   ("max_ppl_ratio", max_ppl_ratio)) if v is not None}
    settings = VerifySettings(text=tuple(text), ctx=ctx, chunks=chunks,
                              outtype=deprecated("--thresholds-for", "--outtype", thresholds_for, outtype_old,
                                                 "verify"),
                              overrides=overrides, save_base=tuple(save_base), base=tuple(base), device=device,
                              dtype=dtype, plot=plot, tokenizer=tokenizer)
    report = run_verify(candidate, reference, settings)
    write_json({k: v for k, v in report.items() if k != "_text"}, json_out)
    click.echo(report["_text"], err=str(json_out) == "-")
    if not report["passed"]:
        click.echo(f"mxtools: verification failed: {', '.join(report['failures'])}", err=True)
        sys.exit(VERDICT_FAILED)


@main.command(cls=Verb, epilog="Example: mxtools compare ex/model --formats q4_k_m,q4_k_m+gptq,gptq-int4 --plot c.png")
@click.argument("model_path", metavar="MODEL", type=InputPath())
@click.option("--formats", "fmts", metavar="F1,F2,...",
              help=f"candidate formats (default {','.join(COMPARE_FORMATS)}); also every GGUF mix (+imatrix, +gptq; "
                   "the i-quant mixes +imatrix, some also alone), gptq-int8, rtn-int8, bnb-fp4")
@click.option("--calib", type=InputPath(dir_okay=False), metavar="TEXT",
              help="calibration text for GPTQ and the imatrix (default: the bundled calibration text)")
@click.option("--text", type=InputPath(dir_okay=False), multiple=True,
              help="evaluation text; repeat for several (default: both bundled held-out texts, Wikipedia and fiction)")
@click.option("--chunks", type=int, help="evaluate only the first N chunks")
@json_option("the rows")
@click.option("--plot", type=OutputPath(), metavar="FILE", help="draw mean KLD against bits per weight (PNG)")
@click.option("--keep", type=OutputPath(), metavar="DIR", help="build the candidates in this new directory, keep them")
@device_option()
@force_option()
def compare(model_path, fmts, calib, text, chunks, json_out, plot, keep, device, force):
    """Build every candidate format from MODEL, verify each against MODEL, print one table sorted by size."""
    from ..commands.compare import render, run_compare
    result = run_compare(model_path, fmts=fmts, calib=calib, text=tuple(text), chunks=chunks, device=device,
                         keep=keep, plot=plot, progress=lambda msg: click.echo(msg, err=True))
    write_json(result, json_out)
    click.echo(render(result), err=str(json_out) == "-")


@main.command(cls=Verb, epilog="Example: mxtools inspect model-q4_k_m.gguf --json -")
@click.argument("path", type=InputPath())
@json_option("the report")
@click.option("--weights/--no-weights", "scan", default=True, show_default=True,
              help="read every weight once, one tensor at a time, for NaN/inf values and unreadable data")
@force_option()
def inspect(path, json_out, scan, force):
    """Layout, config, tensor count, dtypes, sizes, and any problems found (exit 2 when there are any)."""
    from ..commands.inspect import describe, render
    report = describe(path, scan)
    if json_out is None:
        click.echo(render(report))
    write_json(report, json_out)
    problems = report["problems"]
    if problems:
        fail(problems[0] + (f" (and {len(problems) - 1} more problems listed above)" if len(problems) > 1 else ""))
