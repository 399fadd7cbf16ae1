"""Opening the model a verb runs: any layout, with a tokenizer it can use. A checkpoint that carries none gets
the one given (`--tokenizer FILE`: a SentencePiece .model, or a tokenizer.json read through the tokenizers
library) or the Mixtral v1 tokenizer, and the latter is said on stderr (logger
"mxtools"), never assumed silently."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..core.tensors import Checkpoint
from ..core.tokenizer import Tokenizer
from ..core.tokenizer_json import JsonTokenizer
from ..layouts import open_checkpoint

log = logging.getLogger("mxtools")


def with_tokenizer(ckpt: Checkpoint, tokenizer_file: Path | None = None) -> Checkpoint:
    """`ckpt`, its tokenizer replaced by `tokenizer_file` when given, else the Mixtral v1 one when it has none."""
    if tokenizer_file is not None:
        path = Path(tokenizer_file)
        ckpt.tokenizer = JsonTokenizer.from_json_file(path) if path.suffix == ".json" else Tokenizer.from_file(path)
    elif ckpt.tokenizer is None:
        log.info(f"{ckpt.path}: no tokenizer in this checkpoint; assuming the Mixtral v1 tokenizer "
                 "(--tokenizer FILE chooses another)")
        ckpt.tokenizer = Tokenizer.default()
    return ckpt


@contextlib.contextmanager
def open_model(path, tokenizer_file: Path | None = None):
    """open_checkpoint(path) with a tokenizer (see with_tokenizer); closed on exit."""
    with open_checkpoint(path) as ckpt:
        yield with_tokenizer(ckpt, tokenizer_file)
