"""The verbs that write checkpoints: convert, quantize, imatrix, synth, example."""
from __future__ import annotations

import click

from ..core.defaults import CTX, GPTQ_NAMINGS, QUANTIZE, SHARD_BYTES, WRITABLE_LAYOUTS
from ..core.errors import MxError
from . import main
from .params import (
    InputPath,
    OutputPath,
    Verb,
    deprecated,
    device_option,
    force_option,
    output_option,
    parse_size,
    progress_bar,
    tokenizer_option,
)


@main.command(cls=Verb, epilog="Example: mxtools convert ex/model --to gguf --outtype q4_k_m -o model-q4_k_m.gguf")
@click.argument("src", type=InputPath())
@click.option("--to", "layout", required=True, type=click.Choice(WRITABLE_LAYOUTS), help="the layout to write")
@click.option("--outtype", default="auto", show_default=True,
              help="f32|f16|bf16 (all layouts); for gguf also the llama.cpp mixes in recipes/gguf (q8_0, q6_k, "
                   "q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, q5_0, q5_1, q4_0, q4_1); auto keeps "
                   "the source's type")
@click.option("--imatrix", type=InputPath(dir_okay=False), metavar="FILE",
              help="importance matrix (ours or llama.cpp's, GGUF or legacy .dat) for block-quantized outtypes")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="gguf mixes, as llama-quantize: tensors whose GGUF name matches REGEX get TYPE (first match wins)")
@click.option("--output-tensor-type", metavar="TYPE", help="gguf mixes: the output matrix's type")
@click.option("--token-embedding-type", metavar="TYPE", help="gguf mixes: the token embedding's type")
@click.option("--pure", is_flag=True, help="gguf mixes: every weight in the mix's default type (llama-quantize --pure)")
@click.option("--shard-size", default=f"{SHARD_BYTES // 10**9}GB", show_default=True,
              help="the largest shard of an HF or GPTQ output")
@click.option("--names", type=click.Choice(GPTQ_NAMINGS),
              help="--to gptq: tensor names for vLLM (default) or transformers 5 / GPTQModel; a GPTQ source is "
                   "re-exported byte for byte under them")
@click.option("--chat-template", default="auto", show_default=True, metavar="auto|keep|mistral-common|FILE",
              help="auto: mistral-common's template where the source's is known to give other token ids")
@tokenizer_option()
@output_option(required=True, help="the output file (gguf) or directory")
@force_option()
def convert(src, layout, outtype, imatrix, tensor_types, output_tensor_type, token_embedding_type, pure, shard_size,
            names, chat_template, tokenizer, out, force):
    """Convert SRC (any layout) to another layout, streaming one tensor at a time."""
    from ..commands.convert import ConvertSettings, run_convert
    settings = ConvertSettings(layout, outtype, imatrix, tensor_types, output_tensor_type, token_embedding_type,
                               pure, parse_size(shard_size), names, chat_template, force, tokenizer)
    for note in run_convert(src, out, settings, progress_bar):
        click.echo(note, err=True)
    click.echo(f"wrote {out}")


def _default(key: str) -> str:
    return f" (default {QUANTIZE[key]})"


@main.command(cls=Verb, epilog="Examples: mxtools quantize ex/model -o model-gptq\n\n"
                               "          mxtools quantize ex/model --to gguf --outtype q3_k_m -o model-q3_k_m.gguf")
@click.argument("src", type=InputPath())
@click.option("--to", "target", default="gptq", show_default=True, type=click.Choice(["gptq", "gguf"]),
              help="gptq: a GPTQ v1 checkpoint (HF layout); gguf: one GGUF file in a llama.cpp mix (--outtype), "
                   "GPTQ on llama.cpp's own block grids")
@click.option("--outtype", help="--to gguf: the llama.cpp mix (q4_k_m, q3_k_m, q2_k, ... as in recipes/gguf)")
@click.option("--imatrix", type=InputPath(dir_okay=False), metavar="FILE",
              help="--to gguf: an importance matrix; weights ggml's scale searches instead of the Hessian "
                   "diagonal, and selects llama.cpp's imatrix type choices")
@click.option("--bits", type=click.Choice(["2", "4", "8"]), help="bits per weight" + _default("bits"))
@click.option("--method", type=click.Choice(["gptq", "rtn"]), help="GPTQ or round-to-nearest" + _default("method"))
@click.option("--group-size", type=int, help="columns per scale; -1 for one group per row" + _default("group_size"))
@click.option("--sym/--asym", default=None, help="symmetric (default; what vLLM's Marlin kernels need) or not")
@click.option("--act-order", is_flag=True, default=None,
              help="process columns by decreasing Hessian diagonal (g_idx not monotone; default: group-aware order)")
@click.option("--damp", type=float, help="damping, a fraction of the mean Hessian diagonal" + _default("damp"))
@click.option("--calib", type=InputPath(dir_okay=False), metavar="TEXT",
              help="calibration text (default: the bundled calibration text)")
@click.option("--nsamples", type=int, help="calibration sequences" + _default("nsamples"))
@click.option("--seqlen", type=int, help="tokens per calibration sequence" + _default("seqlen"))
@click.option("--experts", type=click.Choice(["routed", "all"]),
              help="each expert's Hessian from its routed tokens (default) or from every token")
@click.option("--min-tokens", type=int, help="an expert matrix with fewer calibration tokens falls back to RTN "
              "(default: 10% of its input width)")
@click.option("--gptaq", type=float, metavar="ALPHA",
              help="the asymmetric objective (GPTAQ): layers also correct the error of the quantized layers before "
                   "them, ALPHA of the least-squares correction (0 off, the default; 1 whole). Costs a second, "
                   "unquantized forward stream; on the bundled model it helps --to gguf's low-bit mixes most")
@click.option("--tune-iters", type=click.IntRange(0), metavar="N",
              help="block-output reconstruction: signed-gradient steps per decoder layer after GPTQ, tuning the "
                   "scales so the layer reproduces the float model's output (0: off; --to gguf: on by default "
                   "for the mixes of at most 5 bits per weight, q4_k_m and below)" + _default("tune_iters"))
@click.option("--recipe", help="a named recipe in recipes/ (e.g. gptq-int4-g128) or a YAML file")
@click.option("--names", default=GPTQ_NAMINGS[0], show_default=True, type=click.Choice(GPTQ_NAMINGS),
              help="tensor names: vLLM's (block_sparse_moe.experts.E.w1) or transformers 5's, which GPTQModel "
                   "loads (mlp.experts.E.gate_proj)")
@tokenizer_option()
@device_option()
@output_option(required=True, help="the output directory (--to gptq) or GGUF file (--to gguf)")
@force_option()
def quantize(src, target, outtype, imatrix, bits, method, group_size, sym, act_order, damp, calib, nsamples, seqlen,
             experts, min_tokens, gptaq, tune_iters, recipe, names, tokenizer, device, out, force):
    """GPTQ (or RTN) of every Linear, layer by layer; writes a GPTQ v1 checkpoint (HF layout), or with --to gguf
    a GGUF in a llama.cpp mix."""
    from ..commands.quantize import QuantizeSettings, run_quantize, run_quantize_gguf, summary
    settings = QuantizeSettings(recipe=recipe, calib=calib, tokenizer=tokenizer, device=device, force=force,
                                names=names, bits=int(bits) if bits else None, method=method, group_size=group_size,
                                sym=sym, act_order=act_order, damp=damp, nsamples=nsamples, seqlen=seqlen,
                                experts=experts, min_tokens=min_tokens, gptaq=gptaq, tune_iters=tune_iters)
    if target == "gguf":
        report = run_quantize_gguf(src, out, outtype, settings, imatrix_path=imatrix)
    elif outtype or imatrix:
        raise MxError("--outtype and --imatrix apply to --to gguf")
    else:
        report = run_quantize(src, out, settings)
    click.echo(summary(report))
    click.echo(f"wrote {out}")


@main.command(cls=Verb, epilog="Example: mxtools imatrix ex/model --calib ex/calib.txt -o imatrix.gguf")
@click.argument("model_path", metavar="MODEL", type=InputPath())
@click.option("--calib", type=InputPath(dir_okay=False), metavar="TEXT",
              help="calibration text (default: the bundled calibration text)")
@click.option("--text", "text_old", type=InputPath(dir_okay=False), hidden=True, help="old spelling of --calib")
@click.option("--ctx", default=CTX, show_default=True, help="tokens per chunk")
@click.option("--chunks", type=int, help="use only the first N chunks")
@tokenizer_option()
@device_option()
@output_option(required=True, help="the importance matrix file (GGUF)")
@force_option()
def imatrix(model_path, calib, text_old, ctx, chunks, tokenizer, device, out, force):
    """Importance matrix (mean squared input activation per column, per expert over its routed tokens), in the
    GGUF imatrix format current llama.cpp reads."""
    from ..commands.imatrix import imatrix_from_text
    from ..core.defaults import CALIB
    text = deprecated("--calib", "--text", calib, text_old, "imatrix") or CALIB
    imatrix_from_text(model_path, text, out, ctx=ctx, chunks=chunks, device=device, force=force, tokenizer=tokenizer)
    click.echo(f"wrote {out}")


@main.command(cls=Verb, epilog="Example: mxtools synth --layout gguf --preset tiny --layers 4 -o synth.gguf")
@click.argument("out_old", metavar="[OUT]", required=False, type=OutputPath())
@click.option("--layout", default="hf", show_default=True, type=click.Choice(WRITABLE_LAYOUTS),
              help="the layout to write")
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "8x7b"]),
              help="the dimensions to start from; the options below override them")
@click.option("--layers", type=int, help="decoder layers")
@click.option("--hidden", type=int, help="model width (dim)")
@click.option("--intermediate", type=int, help="expert FFN width")
@click.option("--heads", type=int, help="attention heads")
@click.option("--kv-heads", type=int, help="key/value heads")
@click.option("--head-dim", type=int, help="width of one head (default: hidden / heads)")
@click.option("--n-experts", type=int, help="experts per layer")
@click.option("--experts", "experts_old", type=int, hidden=True, help="old spelling of --n-experts")
@click.option("--experts-per-tok", type=int, help="experts each token is routed to")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), help="the weights' float type (default bf16)")
@click.option("--dtype", "dtype_old", type=click.Choice(["f32", "f16", "bf16"]), hidden=True,
              help="old spelling of --outtype")
@click.option("--seed", default=0, show_default=True, help="random seed (same seed, same weights)")
@output_option(help="the output file (gguf) or directory")
@force_option()
def synth(out_old, layout, preset, layers, hidden, intermediate, heads, kv_heads, head_dim, n_experts, experts_old,
          experts_per_tok, outtype, dtype_old, seed, out, force):
    """Write a random-weight Mixtral with the real Mistral v1 tokenizer, for pipeline tests."""
    from ..commands.convert import estimate_bytes, write_checkpoint
    from ..commands.synth import synth_checkpoint, synth_spec
    from ..core.tensors import FLOAT_DTYPES
    out = _output(out, out_old, "synth")
    n_experts = deprecated("--n-experts", "--experts", n_experts, experts_old, "synth")
    dtype = deprecated("--outtype", "--dtype", outtype, dtype_old, "synth") or "bf16"
    spec = synth_spec(preset, n_layers=layers, dim=hidden, hidden_dim=intermediate, n_heads=heads,
                      n_kv_heads=kv_heads, head_dim=head_dim or (hidden // heads if hidden and heads else None),
                      n_experts=n_experts, n_experts_per_tok=experts_per_tok)
    ckpt = synth_checkpoint(spec, seed, FLOAT_DTYPES[dtype])
    with progress_bar(estimate_bytes(ckpt, dtype), f"synth {layout}") as bar:
        write_checkpoint(ckpt, layout, out, dtype, force=force, progress=bar.update)
    click.echo(f"wrote {out}")


@main.command(cls=Verb, epilog="Example: mxtools example -o ex   (then: mxtools convert ex/model --to gguf ...)")
@click.argument("out_old", metavar="[OUT]", required=False, type=OutputPath())
@output_option(help="the directory to write (OUT/model, OUT/calib.txt, OUT/eval.txt, OUT/fiction.txt)")
@force_option()
def example(out_old, out, force):
    """Write the bundled tiny trained Mixtral to OUT/model with OUT/calib.txt, OUT/eval.txt and OUT/fiction.txt."""
    from ..commands.example import write_example
    out = _output(out, out_old, "example")
    write_example(out, force)
    click.echo(f"wrote {out}/model, {out}/calib.txt, {out}/eval.txt, {out}/fiction.txt")


def _output(out, out_old, verb: str):
    """-o OUT, or the positional OUT of earlier releases (with a deprecation line)."""
    if out is None and out_old is None:
        raise click.UsageError("give the output with -o OUT")
    if out_old is not None:
        click.echo(f"mxtools: warning: {verb} OUT (positional) is deprecated and goes in the next release; "
                   "use -o OUT", err=True)
        if out is not None:
            raise click.UsageError("give -o OUT or the positional OUT, not both")
    return out or out_old
