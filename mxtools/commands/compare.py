"""`mxtools compare MODEL`: which format to ship. Every candidate format is built from MODEL (a load-time format,
bitsandbytes', is simulated: its weights as bitsandbytes computes them, written as a float checkpoint), verified
against MODEL with `verify`'s protocol over one saved base of MODEL's log-probabilities, and tabulated by size.

Candidates are made one at a time in a scratch directory, each removed once verified, the directory at the end
(`keep`: all of it stays in that directory instead).

bitsandbytes rows: transformers' bitsandbytes integration replaces every `nn.Linear` of the model except the
modules `get_keys_to_not_convert` returns (tied weights, the output embeddings: lm_head) and
`llm_int8_skip_modules` (transformers/quantizers/base.py, integrations/bitsandbytes.py). With Mixtral's experts as
separate Linears (transformers 4.x: block_sparse_moe.experts.E.w1/w2/w3 and the router block_sparse_moe.gate are
`nn.Linear`) that is every Linear but lm_head: BNB_KINDS. (transformers 5 stores the experts as 3-D parameters
and the router as a plain parameter, so there `load_in_4bit` quantizes only q/k/v/o_proj.) NF4 is Linear4bit's
Params4bit: blocks of 64, no double quantization (bnb_4bit_use_double_quant=False), in the weight's own dtype
(bnb-fp4: the same with bnb_4bit_quant_type's default, "fp4");
LLM.int8 is Int8Params: the weight cast to float16, one absmax scale per row (int8_vectorwise_quant). Only the
weights are simulated: LLM.int8's int8 activations and fp16 outlier columns are not.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import names
from ..core.defaults import COMPARE_FORMATS
from ..core.errors import MxError, OutputError
from ..core.tensors import LazyTensor, dense_nbytes
from ..io.buffers import give_source
from ..verify.report import DEFAULT_THRESHOLDS, check, thresholds_for

DEFAULT_FORMATS = COMPARE_FORMATS
BNB_KINDS = tuple(k.key for k in names.KINDS if k.linear and k.key != "output")  # every Linear but lm_head
BNB_HINT = "bitsandbytes is not installed: pip install 'mxtools[bnb]' (bitsandbytes>=0.50)"
BNB_BLOCK = 64  # Params4bit's default blocksize, which transformers keeps
CTX = 512  # verify's default chunk length
IMATRIX_CHUNKS = 128  # 65,536 tokens, a usual llama-imatrix run (all of a 2.5 MB text would be ~1,200 chunks)


@dataclass(frozen=True)
class Format:
    """A candidate format: its name, verify's threshold row for it, and how to build it from the model."""

    name: str
    outtype: str
    build: Callable  # build(job, out) -> path of the candidate
    needs: str = ""  # a Python package it needs ("bitsandbytes")


@dataclass
class Job:
    """One compare run: the model, the texts, the scratch directory, and what is shared between candidates."""

    model: Path
    calib: Path
    texts: dict  # name -> evaluation text (verify.eval_texts)
    chunks: int | None
    device: str
    scratch: Path
    _imatrix: Path | None = None

    def imatrix(self) -> Path:
        """The model's importance matrix over the first IMATRIX_CHUNKS chunks of the calibration text, once."""
        if self._imatrix is None:
            from .imatrix import imatrix_from_text
            self._imatrix = imatrix_from_text(self.model, self.calib, self.scratch / "imatrix.gguf",
                                              chunks=IMATRIX_CHUNKS, device=self.device)
        return self._imatrix


# ---------------------------------------------------------------- building the candidates

def _gguf(mix: str, imatrix: bool):
    def build(job: Job, out: Path) -> Path:
        from .convert import convert
        return convert(job.model, "gguf", out.with_suffix(".gguf"), mix,
                       imatrix_path=job.imatrix() if imatrix else None)
    return build


def _gguf_gptq(mix: str):
    def build(job: Job, out: Path) -> Path:
        from .quantize import QuantizeSettings, run_quantize_gguf
        path = out.with_suffix(".gguf")
        run_quantize_gguf(job.model, path, mix, QuantizeSettings(calib=job.calib, device=job.device))
        return path
    return build


def _gptq(method: str, bits: int):
    def build(job: Job, out: Path) -> Path:
        from .quantize import QuantizeSettings, run_quantize
        run_quantize(job.model, out, QuantizeSettings(calib=job.calib, bits=bits, method=method, device=job.device))
        return out
    return build


def _bnb(kind: str):
    def build(job: Job, out: Path) -> Path:
        from ..layouts import open_checkpoint
        from .convert import write_checkpoint
        with open_checkpoint(job.model) as ckpt:
            sim = dataclasses.replace(ckpt, tensors={n: _bnb_tensor(t, kind) for n, t in ckpt.tensors.items()},
                                      closers=[])
            return write_checkpoint(sim, "hf", out, "f32", inputs=[job.model])
    return build


def _bnb_tensor(t: LazyTensor, kind: str) -> LazyTensor:
    """The weight as bitsandbytes computes with it (float32) where transformers would quantize it, else t."""
    parsed = names.parse(t.name)
    if parsed is None or parsed[0].key not in BNB_KINDS:
        return t
    simulate = int8 if kind == "int8" else functools.partial(bnb_4bit, quant_type=kind)

    def load() -> torch.Tensor:
        w = t.load()
        out = simulate(w)
        give_source(w, out)
        return out
    return LazyTensor(t.name, t.shape, torch.float32, load, t.source, f"bnb-{kind}")


def bnb_4bit(w: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """The weight Linear4bit computes with: bitsandbytes' NF4 (or FP4) of w in blocks of 64, in w's dtype, as
    float32."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    packed, state = quantize_4bit(w.contiguous(), blocksize=BNB_BLOCK, compress_statistics=False,
                                  quant_type=quant_type)
    return dequantize_4bit(packed, state).float()


def int8(w: torch.Tensor) -> torch.Tensor:
    """The weight Linear8bitLt computes with: bitsandbytes' row-wise int8 of w as float16, as float32."""
    from bitsandbytes.functional import int8_vectorwise_dequant, int8_vectorwise_quant
    codes, scales, _ = int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return int8_vectorwise_dequant(codes, scales)


def bnb_bytes(shape: tuple, kind: str) -> int:
    """What bitsandbytes stores for one quantized weight: 4-bit codes + a float32 absmax per block of 64, or
    int8 codes + a float32 scale per row."""
    n = torch.Size(shape).numel()
    return n + shape[0] * 4 if kind == "int8" else n // 2 + -(-n // BNB_BLOCK) * 4


def formats() -> dict[str, Format]:
    """Every format compare can build: the GGUF mixes (each also +imatrix, and +gptq: `quantize --to gguf`),
    GPTQ and RTN int4/int8, bnb. A mix that may need an importance matrix (the IQ1/IQ2/IQ3_XXS/IQ3_XS mixes)
    is offered only +imatrix; +gptq is offered for every mix (GPTQ onto the K, legacy and i-quant types)."""
    from ..quant.gguf_gptq import on_grids
    from ..quant.mixes import MIXES, load_mix
    out = {}
    for name in MIXES:
        mix = load_mix(name)
        if not mix.may_need_imatrix():
            out[name] = Format(name, name, _gguf(name, False))
        out[f"{name}+imatrix"] = Format(f"{name}+imatrix", name, _gguf(name, True))
        if on_grids(mix.types()):
            out[f"{name}+gptq"] = Format(f"{name}+gptq", name, _gguf_gptq(name))
    for method in ("gptq", "rtn"):
        for bits in (4, 8):
            out[f"{method}-int{bits}"] = Format(f"{method}-int{bits}", f"gptq-int{bits}", _gptq(method, bits))
    out["bnb-nf4"] = Format("bnb-nf4", "q4_0", _bnb("nf4"), "bitsandbytes")
    out["bnb-fp4"] = Format("bnb-fp4", "q4_0", _bnb("fp4"), "bitsandbytes")  # load_in_4bit's default type
    out["bnb-int8"] = Format("bnb-int8", "q8_0", _bnb("int8"), "bitsandbytes")
    return out


def parse_formats(text: str | None) -> list[Format]:
    """The formats named in a comma-separated list (default DEFAULT_FORMATS); unknown names and a missing
    bitsandbytes are refused before any work."""
    known = formats()
    wanted = [f.strip() for f in text.split(",") if f.strip()] if text else list(DEFAULT_FORMATS)
    unknown = [f for f in wanted if f not in known]
    if unknown or not wanted:
        raise MxError(f"unknown format(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    chosen = [known[f] for f in dict.fromkeys(wanted)]
    if any(f.needs == "bitsandbytes" for f in chosen) and not _have_bitsandbytes():
        raise MxError(BNB_HINT)
    return chosen


def _have_bitsandbytes() -> bool:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns about optional kernels
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- sizes

def stored_bytes(path: Path, model: Path, fmt: Format) -> tuple[int, int]:
    """(bytes of every stored tensor, bytes of the decoder layers' tensors) of a built candidate."""
    if fmt.needs == "bitsandbytes":
        return _bnb_sizes(model, fmt.name.removeprefix("bnb-"))
    if path.is_file():
        from gguf import GGUFReader
        sizes = [(t.name, int(t.n_bytes)) for t in GGUFReader(path).tensors]
        return sum(n for _, n in sizes), sum(n for name, n in sizes if name.startswith("blk."))
    from ..io.safetensors import SafetensorsFile
    total = layers = 0
    for f in path.glob("*.safetensors"):
        st = SafetensorsFile(f)
        for key in st.keys():
            t = st.lazy(key)
            n = dense_nbytes(t.shape, t.dtype)
            total, layers = total + n, layers + (n if key.startswith("model.layers.") else 0)
        st.close()
    return total, layers


def _bnb_sizes(model: Path, kind: str) -> tuple[int, int]:
    from ..layouts import open_checkpoint
    total = layers = 0
    with open_checkpoint(model) as ckpt:
        for name, t in ckpt.tensors.items():
            quantized = names.parse(name)[0].key in BNB_KINDS
            n = bnb_bytes(tuple(t.shape), kind) if quantized else dense_nbytes(t.shape, t.dtype)
            total, layers = total + n, layers + (n if names.parse(name)[1] is not None else 0)
    return total, layers


def param_counts(spec) -> tuple[int, int]:
    """(all parameters, parameters of the decoder layers) of a Mixtral of this spec."""
    counts = [(torch.Size(names.expected_shape(n, spec)).numel(), names.parse(n)[1] is not None)
              for n in names.canonical_names(spec)]
    return sum(c for c, _ in counts), sum(c for c, in_layer in counts if in_layer)


# ---------------------------------------------------------------- the run

def run_compare(model, *, fmts: str | None = None, calib=None, text=None, chunks: int | None = None,
                device: str = "auto", keep=None, plot=None, progress=lambda msg: None) -> dict:
    """`mxtools compare`: build, verify and tabulate every format; returns {"rows": [...], ...} (rows by size)."""
    from ..core.bundled import CALIB
    from ..io.atomic import check_output
    from ..layouts import open_checkpoint
    from .verify import eval_texts
    chosen = parse_formats(fmts)
    if keep is not None:
        check_output(Path(keep), [Path(model)], force=True)  # never inside the model
        if Path(keep).exists():
            raise OutputError("--keep needs a new directory; this one exists", file=keep)
    with open_checkpoint(model) as ckpt:
        spec = ckpt.spec
    scratch = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="mxtools-compare-"))
    scratch.mkdir(parents=True, exist_ok=True)
    job = Job(Path(model), Path(calib or CALIB), eval_texts(text), chunks, device, scratch)
    try:
        bases = {}
        for name, path in job.texts.items():
            progress(f"reference log-probabilities of {model} on {name}")
            bases[name] = scratch / ("base.logprobs" if len(job.texts) == 1 else f"base-{name}.logprobs")
            _verify(job, path, job.model, None, save_base=bases[name])
        counts = param_counts(spec)
        rows = [_candidate(job, fmt, bases, counts, progress, keep is not None) for fmt in chosen]
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    first = next(iter(job.texts.values()))
    result = {"model": str(model), "text": str(first), "texts": {k: str(v) for k, v in job.texts.items()},
              "calib": str(job.calib), "chunks": chunks, "rows": sorted(rows, key=lambda r: (r["bytes"], r["format"]))}
    if plot:
        draw(result, Path(plot))
    return result


def _verify(job: Job, text: Path, candidate: Path, outtype: str | None, save_base=None, base=None) -> dict:
    from .verify import VerifySettings, run_verify
    return run_verify(candidate, None, VerifySettings(text=text, ctx=CTX, chunks=job.chunks, outtype=outtype,
                                                      save_base=save_base, base=base, device=job.device, dtype="f32"))


def _candidate(job: Job, fmt: Format, bases: dict, params: tuple[int, int], progress, keep: bool) -> dict:
    """Build one candidate, verify it against the saved base of every text, and return its table row: the first
    text's figures at the top level (as with one text), every text's under "texts"; passed only when it passes
    on every text."""
    progress(f"building {fmt.name}")
    path = fmt.build(job, job.scratch / fmt.name)
    try:
        per_text = {}
        for name, text in job.texts.items():
            progress(f"verifying {fmt.name} on {name}")
            per_text[name] = _quality(_verify(job, text, path, fmt.outtype, base=bases[name]))
        total, layers = stored_bytes(path, job.model, fmt)
    finally:
        if not keep:
            _remove(path)
    first = next(iter(per_text.values()))
    failures = [f for r in per_text.values() for f in r["failures"]] if len(per_text) == 1 else \
        [f"{name}: {f}" for name, r in per_text.items() for f in r["failures"]]
    return {"format": fmt.name, "bytes": total, "bpw": 8 * total / params[0], "bpw_layers": 8 * layers / params[1],
            **{k: first[k] for k in ("kld_mean", "kld_unc", "ppl_ratio", "same_top_p", "within")},
            "outtype": fmt.outtype, "passed": not failures, "failures": failures, "texts": per_text,
            "path": str(path) if keep else None}


def _quality(report: dict) -> dict:
    """One text's figures of a candidate (chunk_kld: per-chunk mean KLDs, for paired comparisons)."""
    return {"kld_mean": report["kld_mean"], "kld_unc": report["stats"].get("kld_unc"),
            "ppl_ratio": report["ppl_ratio"], "same_top_p": report["same_top_p"], "passed": report["passed"],
            "failures": report["failures"], "within": within(report), "chunk_kld": report["stats"].get("chunk_kld")}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def within(report: dict) -> str | None:
    """The strictest of verify's default threshold rows whose PPL ratio, mean KLD and same-top limits the
    report meets (None: not even the loosest)."""
    rows = sorted(DEFAULT_THRESHOLDS, key=lambda k: DEFAULT_THRESHOLDS[k]["max_kld_mean"])  # ties: table order
    quality = {k: report.get(k) for k in ("ppl", "ppl_ratio", "kld_mean", "same_top_p")}
    return next((row for row in rows if not check(quality, thresholds_for(row))), None)


# ---------------------------------------------------------------- outputs

def render(result: dict) -> str:
    """The table, smallest first: mean KLD, PPL ratio and same-top share per text (one column group each)."""
    names = list(result.get("texts") or {"": result.get("text")})
    cols = "".join(f" {'KLD ' + n if len(names) > 1 else 'mean KLD':>14} {'PPL ratio':>9} {'same top':>8}"
                   for n in names)
    head = f"{'format':<16} {'bpw':>6} {'bpw(layers)':>11} {'size':>10}{cols}  verify defaults"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        verdict = "pass" if r["passed"] else "FAIL " + ",".join(r["failures"])
        per = list(r.get("texts", {}).values()) or [r]
        vals = "".join(f" {t['kld_mean']:>14.3g} {t['ppl_ratio']:>9.4f} {t['same_top_p']:>8.3f}" for t in per)
        lines.append(f"{r['format']:<16} {r['bpw']:>6.2f} {r['bpw_layers']:>11.2f} {_mb(r['bytes']):>10}{vals}  "
                     f"{verdict} ({r['outtype']}); within {r['within'] or 'none'}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def draw(result: dict, path: Path) -> None:
    """Mean KLD (log scale) against bits per weight of the decoder layers, one labelled point per format."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_output
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"bnb": "tab:red", "gptq": "tab:blue", "rtn": "tab:blue"}
    for r in result["rows"]:
        ax.scatter(r["bpw_layers"], r["kld_mean"], color=colors.get(r["format"].split("-")[0], "tab:green"))
        ax.annotate(r["format"], (r["bpw_layers"], r["kld_mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set(yscale="log", xlabel="bits per weight (decoder layers)", ylabel="mean KL divergence",
           title=f"{Path(result['model']).name}: quality against size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, directory=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
