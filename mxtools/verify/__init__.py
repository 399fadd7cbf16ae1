"""Verify a converted or quantized Mixtral against a reference: perplexity, KL divergence, per-layer lockstep.

    report = verify(candidate, reference, chunking.tokenize_file(tokenizer, "eval.txt"), ctx=512)
    print(render_text(report)); report["passed"]

Chunks: mxtools/core/chunking.py (llama.cpp's). Statistics: metrics.py (llama.cpp's perplexity tool). Per-layer
comparison and the `first_divergent_layer` rule: lockstep.py. Report layout and default thresholds per outtype:
report.py.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..core import chunking
from ..core.tensors import Checkpoint
from ..model import forward
from . import lockstep, metrics
from . import report as report_mod
from .metrics import BaseMismatchError, load_base  # noqa: F401 (public API)
from .report import check, render_text  # noqa: F401 (public API)


def verify(candidate: Checkpoint, reference: Checkpoint | None, tokens: list[int], *, ctx=512, chunks=None,
           device="auto", dtype=torch.float32, base=None, save_base=None, thresholds=None,
           chunks_per_pass: int | None = None, outtype: str | None = None) -> dict:
    """Evaluate `candidate` over `tokens` with llama.cpp's chunked protocol and return the report dict.

    tokens: the whole text's token stream as llama.cpp tokenizes it, BOS first (`chunking.tokenize_file`).

    reference: run in lockstep (per-layer statistics, exact KLD); or None.
    base: a saved base (path or `load_base` result) to compare against when there is no reference.
    save_base: path to record the reference's scored log-probs (the candidate's when reference is None).
    thresholds: None (defaults for the candidate's outtype), an outtype name, or a dict of overrides.
    chunks_per_pass: chunks run through the layer stream together (default all: each layer loaded once).
    """
    if reference is not None and base is not None:
        raise ValueError("give a reference checkpoint or a saved base to compare with, not both")
    table = chunking.chunk_tokens(tokens, ctx, chunks)
    saved = _open_base(base, table, candidate.spec.vocab_size)
    outtype = outtype or (thresholds if isinstance(thresholds, str) else report_mod.guess_outtype(candidate))
    limits = report_mod.thresholds_for(outtype, thresholds if isinstance(thresholds, dict) else None)
    acc, state = metrics.Accumulator(), {"sums": None}
    per_pass = chunks_per_pass or table.shape[0]
    writer = (metrics.BaseWriter(save_base, table, candidate.spec.vocab_size) if save_base
              else contextlib.nullcontext())
    with writer:
        for start in range(0, table.shape[0], per_pass):
            group = table[start:start + per_pass]
            for b, lp_c, lp_r in _logprob_pairs(candidate, reference, group, device, dtype, state):
                lp_base = lp_r if saved is None else saved.chunk(start + b)
                acc.add(lp_c, chunking.scored_targets(group[b]), lp_base)
                if save_base:
                    writer.add(lp_c if lp_r is None else lp_r)
    sums = state["sums"]
    layers = sums.layers() if sums else []
    divergent = lockstep.first_divergent_layer(layers, limits["max_layer_error"], limits["max_routing"])
    meta = {"n_ctx": ctx, "n_chunks": int(table.shape[0]), "device": str(forward.resolve_device(device)),
            "dtype": str(dtype).replace("torch.", ""), "base": str(getattr(saved, "path", "")) or None,
            "reference": str(reference.path) if reference is not None else None}
    return report_mod.build(acc.result(), layers, limits, outtype, divergent,
                            sums.embed_error() if sums else None, meta)


def _logprob_pairs(candidate, reference, group, device, dtype, state):
    """Yield (chunk in group, candidate log-probs, reference log-probs or None) at the scored positions."""
    fed, pos = chunking.with_bos(group), chunking.scored_positions(group.shape[1])
    if reference is None:
        h_c = forward.last_hidden(candidate, fed, device, dtype)
        for b, lp in forward.iter_logprobs(candidate, h_c, pos, device, dtype):
            yield b, lp, None
        return
    h_c, h_r, state["sums"] = lockstep.run(candidate, reference, fed, device, dtype, state["sums"])
    pairs = zip(forward.iter_logprobs(candidate, h_c, pos, device, dtype),
                forward.iter_logprobs(reference, h_r, pos, device, dtype))
    for (b, lp_c), (_, lp_r) in pairs:
        yield b, lp_c, lp_r


def _open_base(base, table, n_vocab):
    if base is None:
        return None
    saved = base if isinstance(base, metrics.SavedBase) else load_base(Path(base))
    saved.check(table, n_vocab)
    return saved
