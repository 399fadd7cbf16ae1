"""The independent judges: transformers' MixtralForCausalLM for HF checkpoints, llama.cpp for GGUF files.

`make test` installs every judge, so a missing one FAILS the tests that need it (never skips them); modules
import judges lazily (`require`, `LazyJudge`) so that their tests which need no judge run regardless.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch


def require(module: str):
    """The judge `module`, imported; the calling test fails if it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"judge {module!r} is not installed ({exc}); `make test` installs every judge", pytrace=False)


def require_installed(module: str) -> None:
    """Fail the calling test unless the judge `module` is installed (for judges run in a child process)."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"judge {module!r} is not installed; `make test` installs every judge", pytrace=False)


class LazyJudge:
    """A judge module imported on first attribute access (through `require`)."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(require(self._module), name)


def llama_tool(name: str) -> Path:
    """llama.cpp's command-line tool `name` (llama-quantize, llama-imatrix): $MXTOOLS_LLAMA_BIN/name, else the
    one built with the Python bindings (tools/llama_cpp.sh installs it as site-packages/bin/name)."""
    root = os.environ.get("MXTOOLS_LLAMA_BIN")
    path = Path(root) / name if root else Path(require("llama_cpp").__file__).parents[1] / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} missing: `make test` installs llama.cpp's tools (tools/llama_cpp.sh)", pytrace=False)
    return path


def hf_logits(path, tokens: list[int]) -> torch.Tensor:
    """fp32 logits [T, V] from transformers on an HF-layout directory."""
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def llama_cpp_model(path, n_ctx: int = 256):
    """llama.cpp with an f32 KV cache: its default f16 cache flips near-tied router choices."""
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=2,
                 n_batch=n_ctx, verbose=False)


def llama_cpp_logits(path, tokens: list[int]) -> torch.Tensor:
    llm = llama_cpp_model(path)
    llm.eval(tokens)
    out = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    llm.close()
    return out


def llama_cpp_perplexity(llm, text_file, n_ctx: int, n_chunks: int) -> tuple[float, list[int]]:
    """llama-perplexity's loop (tools/perplexity/perplexity.cpp) on llama.cpp's own functions, for a model
    loaded with `llama_cpp_model(path, n_ctx)`: the file less one trailing newline (as `-f`), tokenized by
    llama.cpp with BOS first, cut into chunks of n_ctx from that stream, each evaluated from an empty cache with
    its first token replaced by BOS, the predictions at positions n_ctx/2 .. n_ctx-2 scored.
    Returns (PPL, llama.cpp's token stream)."""
    text = text_file.read_text(encoding="utf-8").removesuffix("\n")
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    first, nll = n_ctx // 2, []
    for i in range(min(n_chunks, len(tokens) // n_ctx)):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = torch.from_numpy(np.array(llm.scores[first:n_ctx - 1], dtype=np.float64))
        targets = torch.tensor(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        nll.append(-torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0])
    return float(torch.cat(nll).mean().exp()), tokens


def kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) from logits."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)
