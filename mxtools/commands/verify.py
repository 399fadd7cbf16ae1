"""`mxtools verify`: open the artifacts, tokenize the text(s), run the harness (mxtools/verify), draw the plot.

Without a text, the candidate is judged on every bundled held-out text (core.defaults.EVAL_TEXTS: the calibration
domain and another one) and passes only when it passes on each; the report then holds one report per text under
"texts". With one text the report is that text's (as before); with several given texts, as without one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.chunking import tokenize_file
from ..core.defaults import CTX, EVAL_TEXTS
from ..core.errors import MxError
from ..core.tensors import FLOAT_DTYPES
from ..layouts import open_checkpoint
from ..verify import render_text, verify
from .inputs import with_tokenizer


@dataclass(frozen=True)
class VerifySettings:
    """`mxtools verify`'s options (the report's JSON file is the command line's to write). `text`, `save_base` and
    `base` are one path or a sequence of paths: one base (to save or to read) per text, in the texts' order."""

    text: Path | tuple | None = None  # the evaluation text(s) (default: every bundled held-out text)
    ctx: int = CTX
    chunks: int | None = None
    outtype: str | None = None  # whose default thresholds apply (default: guessed from the candidate)
    overrides: dict = field(default_factory=dict)  # threshold name -> value
    save_base: Path | tuple | None = None
    base: Path | tuple | None = None
    device: str = "auto"
    dtype: str = "f32"
    plot: Path | None = None
    tokenizer: Path | None = None


def _many(value) -> list:
    if value is None:
        return []
    return [Path(v) for v in value] if isinstance(value, (list, tuple)) else [Path(value)]


def eval_texts(text) -> dict[str, Path]:
    """The texts to judge on, by name: the bundled held-out texts when `text` is empty, else each given file
    (named by its bundled name when it is one, else by its file name)."""
    given = _many(text)
    if not given:
        return dict(EVAL_TEXTS)
    bundled = {p.resolve(): name for name, p in EVAL_TEXTS.items()}
    named: dict[str, Path] = {}
    for p in given:
        name = bundled.get(p.resolve(), p.name)
        while name in named:
            name += "'"
        named[name] = p
    return named


def _per_text(texts: dict, option: str, value) -> list:
    paths = _many(value)
    if paths and len(paths) != len(texts):
        raise MxError(f"{option} takes one file per evaluation text: {len(paths)} given for {len(texts)} texts "
                      f"({', '.join(texts)}); name the texts with --text, in the same order")
    return paths or [None] * len(texts)


def run_verify(candidate, reference=None, settings: VerifySettings = VerifySettings()) -> dict:
    """Compare `candidate` with a reference model or saved bases on every text; returns the report (with
    `_text`): one text's report, or {"texts": {name: report}, "passed", "failures"} for several."""
    s = settings
    texts = eval_texts(s.text)
    bases, saves = _per_text(texts, "--base", s.base), _per_text(texts, "--save-base", s.save_base)
    if reference is None and not any(bases) and not any(saves):
        raise MxError("give --reference REF or --base FILE to compare against")
    if reference is not None and any(bases):
        raise MxError("give either --reference or --base, not both")
    if s.plot and len(texts) > 1:
        raise MxError(f"--plot draws one text's report; {len(texts)} texts are judged ({', '.join(texts)}): "
                      "give one --text")
    reports = {name: _one_text(candidate, reference, s, path, base, save)
               for (name, path), base, save in zip(texts.items(), bases, saves)}
    if len(reports) == 1:
        report = next(iter(reports.values()))
        report["text"] = str(next(iter(texts.values())))
        if s.plot:
            from ..verify.report import plot as draw
            draw(report, s.plot)
        report["_text"] = render_text(report)
        return report
    for name, r in reports.items():
        r["text"] = str(texts[name])
    failures = [f"{name}: {f}" for name, r in reports.items() for f in r["failures"]]
    rendered = "\n\n".join(f"== {name} ({texts[name]})\n{render_text(r)}" for name, r in reports.items())
    return {"candidate": str(candidate), "texts": reports, "passed": not failures, "failures": failures,
            "_text": rendered}


def _one_text(candidate, reference, s: VerifySettings, text: Path, base, save_base) -> dict:
    """The report of one text."""
    with open_checkpoint(candidate) as cand:
        ref = open_checkpoint(reference) if reference is not None else None
        try:
            holder = ref if ref is not None and ref.tokenizer else cand  # the reference's tokenizer first
            tok = with_tokenizer(holder, s.tokenizer).tokenizer
            tokens = tokenize_file(tok, text)
            if len(tokens) < s.ctx:
                raise MxError(f"text has {len(tokens)} tokens, fewer than one chunk of --ctx {s.ctx}", file=text)
            report = verify(cand, ref, tokens, ctx=s.ctx, chunks=s.chunks, device=s.device,
                            dtype=FLOAT_DTYPES[s.dtype], base=base, save_base=save_base,
                            thresholds=dict(s.overrides) or None, outtype=s.outtype)
        finally:
            if ref is not None:
                ref.close()
    report["candidate"] = str(candidate)
    return report
