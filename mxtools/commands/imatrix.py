"""`mxtools imatrix MODEL --calib TEXT -o OUT`: the importance matrix of a checkpoint over a text, written as the
GGUF imatrix file current llama.cpp reads (the statistics and the file format: quant/imatrix.py)."""
from __future__ import annotations

from pathlib import Path

from ..core.chunking import tokenize_file
from ..core.defaults import CTX
from ..io.atomic import check_output
from ..quant.imatrix import compute_imatrix, save_imatrix
from .inputs import open_model


def imatrix_from_text(model, text_file, out, *, ctx: int = CTX, chunks: int | None = None, device="auto",
                      force: bool = False, progress=lambda n: None, tokenizer: Path | None = None) -> Path:
    """Tokenize FILE with the model's tokenizer (BOS first, as
    llama-imatrix), compute the importance matrix and write it as a GGUF imatrix file.
    `progress(k)` gets the number of chunks done by each pass."""
    check_output(Path(out), [Path(model), Path(text_file)], force)
    with open_model(model, tokenizer) as ckpt:
        tokens = tokenize_file(ckpt.tokenizer, text_file)
        data = compute_imatrix(ckpt, tokens, ctx=ctx, chunks=chunks, device=device, datasets=[str(text_file)],
                               progress=progress)
    return save_imatrix(out, data, force=force)
