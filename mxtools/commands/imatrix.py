"""`mxtools imatrix MODEL --text FILE -o OUT`: the importance matrix of a checkpoint over a text, written as the
GGUF imatrix file current llama.cpp reads (the statistics and the file format: quant/imatrix.py)."""
from __future__ import annotations

from pathlib import Path

from ..core.chunking import tokenize_file
from ..core.tokenizer import Tokenizer
from ..io.atomic import check_output
from ..layouts import open_checkpoint
from ..quant.imatrix import compute_imatrix, save_imatrix


def imatrix_from_text(model, text_file, out, *, ctx: int = 512, chunks: int | None = None, device="auto",
                      force: bool = False, progress=lambda n: None) -> Path:
    """Tokenize FILE with the model's tokenizer (BOS first, as
    llama-imatrix), compute the importance matrix and write it as a GGUF imatrix file.
    `progress(k)` gets the number of chunks done by each pass."""
    check_output(Path(out), [Path(model), Path(text_file)], force)
    with open_checkpoint(model) as ckpt:
        tokens = tokenize_file(ckpt.tokenizer or Tokenizer.default(), text_file)
        data = compute_imatrix(ckpt, tokens, ctx=ctx, chunks=chunks, device=device, datasets=[str(text_file)],
                               progress=progress)
    return save_imatrix(out, data, force=force)
