"""The glue behind `mxtools verify`: open artifacts, tokenize the text, run the harness, write the report."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.bundled import EVAL
from ..core.chunking import tokenize_file
from ..core.errors import MxError
from ..core.tensors import FLOAT_DTYPES
from ..io.atomic import atomic_output
from ..layouts import open_checkpoint
from ..verify import render_text, verify


def run_verify(candidate, reference=None, *, text=None, ctx: int = 512, chunks: int | None = None,
               outtype: str | None = None, overrides: dict | None = None, save_base=None, base=None,
               device: str = "auto", dtype: str = "f32", json_out=None, plot=None) -> dict:
    """`mxtools verify CANDIDATE`: compare with a reference model or a saved base over `text` (default: the
    bundled held-out text), write the JSON report and plot if asked; returns the report (with `_text`)."""
    if reference is None and base is None and save_base is None:
        raise MxError("give --reference REF or --base FILE to compare against")
    if reference is not None and base is not None:
        raise MxError("give either --reference or --base, not both")
    with open_checkpoint(candidate) as cand:
        ref = open_checkpoint(reference) if reference is not None else None
        try:
            tok = (ref.tokenizer if ref is not None and ref.tokenizer else cand.tokenizer)
            if tok is None:
                raise MxError("no tokenizer found in the candidate or the reference", file=candidate)
            tokens = tokenize_file(tok, text or EVAL)
            if len(tokens) < ctx:
                raise MxError(f"text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}", file=text)
            thresholds = {**overrides} if overrides else None
            report = verify(cand, ref, tokens, ctx=ctx, chunks=chunks, device=device, dtype=FLOAT_DTYPES[dtype],
                            base=base, save_base=save_base, thresholds=thresholds, outtype=outtype)
        finally:
            if ref is not None:
                ref.close()
    report["candidate"] = str(candidate)
    if json_out:
        with atomic_output(Path(json_out), directory=False) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str))
    if plot:
        from ..verify.report import plot as draw
        draw(report, plot)
    report["_text"] = render_text(report)
    return report
