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


def kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) from logits."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)
