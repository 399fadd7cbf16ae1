"""`mxtools verify`: open the artifacts, tokenize the text, run the harness (mxtools/verify), draw the plot."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.chunking import tokenize_file
from ..core.defaults import CTX, EVAL
from ..core.errors import MxError
from ..core.tensors import FLOAT_DTYPES
from ..layouts import open_checkpoint
from ..verify import render_text, verify
from .inputs import with_tokenizer


@dataclass(frozen=True)
class VerifySettings:
    """`mxtools verify`'s options (the report's JSON file is the command line's to write)."""

    text: Path | None = None  # the evaluation text (default: the bundled held-out text)
    ctx: int = CTX
    chunks: int | None = None
    outtype: str | None = None  # whose default thresholds apply (default: guessed from the candidate)
    overrides: dict = field(default_factory=dict)  # threshold name -> value
    save_base: Path | None = None
    base: Path | None = None
    device: str = "auto"
    dtype: str = "f32"
    plot: Path | None = None
    tokenizer: Path | None = None


def run_verify(candidate, reference=None, settings: VerifySettings = VerifySettings()) -> dict:
    """Compare `candidate` with a reference model or a saved base; returns the report (with `_text`)."""
    s = settings
    if reference is None and s.base is None and s.save_base is None:
        raise MxError("give --reference REF or --base FILE to compare against")
    if reference is not None and s.base is not None:
        raise MxError("give either --reference or --base, not both")
    with open_checkpoint(candidate) as cand:
        ref = open_checkpoint(reference) if reference is not None else None
        try:
            holder = ref if ref is not None and ref.tokenizer else cand  # the reference's tokenizer first
            tok = with_tokenizer(holder, s.tokenizer).tokenizer
            tokens = tokenize_file(tok, s.text or EVAL)
            if len(tokens) < s.ctx:
                raise MxError(f"text has {len(tokens)} tokens, fewer than one chunk of --ctx {s.ctx}", file=s.text)
            report = verify(cand, ref, tokens, ctx=s.ctx, chunks=s.chunks, device=s.device,
                            dtype=FLOAT_DTYPES[s.dtype], base=s.base, save_base=s.save_base,
                            thresholds=dict(s.overrides) or None, outtype=s.outtype)
        finally:
            if ref is not None:
                ref.close()
    report["candidate"] = str(candidate)
    if s.plot:
        from ..verify.report import plot as draw
        draw(report, s.plot)
    report["_text"] = render_text(report)
    return report
