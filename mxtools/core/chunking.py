"""A text as llama.cpp's llama-perplexity and llama-imatrix cut it into evaluation chunks; used by `verify`
(perplexity, KL divergence) and `imatrix` alike.

Both tools (tools/perplexity/perplexity.cpp, tools/imatrix/imatrix.cpp) read `-f FILE` less one trailing
newline and tokenize the whole text once with the special tokens on, so the stream starts with BOS when the
vocabulary adds BOS (Mixtral's does). That stream is cut into len(stream) // n_ctx consecutive chunks of n_ctx
tokens (at most --chunks; a trailing partial chunk is dropped): chunk 0 is [BOS, t0 .. t(n_ctx-2)], chunk 1
starts at t(n_ctx-1). Each chunk is fed with its first token replaced by BOS. Perplexity scores only the second
half: the predictions made at positions n_ctx/2 .. n_ctx-2, of the tokens at n_ctx/2+1 .. n_ctx-1, i.e.
n_ctx - 1 - n_ctx/2 per chunk. One difference: llama.cpp wants at least two chunks of text, we accept one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import MxError, ShapeError

BOS_ID = 1  # Mixtral's <s>


def read_text(path) -> str:
    """A text file as llama.cpp's `-f FILE` reads it: the whole file less one trailing newline."""
    try:
        return Path(path).read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise MxError(f"cannot read the text: {exc}", file=path) from None


def tokenize_file(tokenizer, path) -> list[int]:
    """The token stream llama.cpp evaluates: the file's text tokenized once, BOS first if the tokenizer adds it."""
    return tokenizer.encode(read_text(path))


def chunk_tokens(tokens, n_ctx: int, chunks: int | None = None) -> torch.Tensor:
    """The chunks [n, n_ctx] of the token stream, as cut (before the BOS replacement of `with_bos`)."""
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if n_ctx < 4:
        raise ShapeError(f"context size {n_ctx} is too small (at least 4)")
    n = t.numel() // n_ctx if chunks is None else min(int(chunks), t.numel() // n_ctx)
    if n < 1:
        raise ShapeError(f"{t.numel()} tokens are fewer than one chunk of {n_ctx}; give more text or a smaller ctx")
    return t[:n * n_ctx].view(n, n_ctx)


def with_bos(chunks: torch.Tensor, bos_id: int | None = BOS_ID) -> torch.Tensor:
    """What the model is fed: each chunk with its first token replaced by BOS (unchanged when bos_id is None,
    for a vocabulary that adds no BOS)."""
    out = chunks.clone()
    if bos_id is not None:
        out[:, 0] = bos_id
    return out


def first_scored(n_ctx: int) -> int:
    return n_ctx // 2


def scored_positions(n_ctx: int) -> slice:
    """Positions whose predictions are scored (their logits predict the next token)."""
    return slice(first_scored(n_ctx), n_ctx - 1)


def scored_targets(chunk: torch.Tensor) -> torch.Tensor:
    """The tokens predicted at the scored positions of one chunk (as cut)."""
    return chunk[first_scored(chunk.shape[-1]) + 1:]


def n_scored(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2
