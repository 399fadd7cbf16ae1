"""`mxtools inspect`: what a checkpoint is and what is wrong with it: headers and config first, then (unless
--no-weights) one bounded-memory pass over the weights for NaN/inf values and unreadable data."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ..core.chat import describe_difference
from ..core.chat import report as chat_report
from ..core.errors import MxError, NonFiniteError, reading
from ..core.tensors import first_non_finite
from ..io.buffers import POOL
from ..layouts import detect


def describe(path: Path, scan: bool = True) -> dict:
    """The report; `scan` also reads every weight (see scan_weights), which costs one read of the checkpoint."""
    layout = detect(path)
    ckpt = layout.read(Path(path))
    try:
        types = Counter(t.stored_as or str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values())
        params = sum(torch.Size(t.shape).numel() for t in ckpt.tensors.values())
        return {"path": str(path), "layout": ckpt.layout, "config": ckpt.spec.to_dict(),
                "tensors": len(ckpt.tensors), "parameters": params, "types": dict(types),
                "file_bytes": _bytes(Path(path)), "tokenizer": ckpt.tokenizer is not None,
                "tokenizer_file": ckpt.tokenizer.kind if ckpt.tokenizer else None,
                "chat_template": bool(ckpt.tokenizer and ckpt.tokenizer.chat_template),
                "chat_template_check": chat_report(ckpt.tokenizer),
                "info": {k: v for k, v in ckpt.info.items() if isinstance(v, (int, str, float, bool, type(None)))},
                "problems": [p.line() if isinstance(p, MxError) else str(p)
                             for p in ckpt.problems() + (scan_weights(ckpt) if scan else [])]}
    finally:
        ckpt.close()


def scan_weights(ckpt) -> list[MxError]:
    """Read every tensor once, one at a time, each buffer given back before the next read (memory: one tensor):
    NaN or infinite values, and data that cannot be read (truncated, corrupt blocks), are problems."""
    out = []
    for t in ckpt.tensors.values():
        try:
            with reading(t.source, t.name):  # a decoder's own exception on corrupt data is this file's problem
                w = t.load()
        except MxError as exc:
            out.append(exc)
            continue
        i = first_non_finite(w)
        POOL.give(w)
        if i is not None:
            out.append(NonFiniteError(f"holds NaN or infinite values (first at flat index {i})", t.source, t.name))
    return out


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def render(r: dict) -> str:
    c = r["config"]
    weights = f" ({r['info']['weights']})" if "weights" in r["info"] else ""  # the files of a multi-format layout
    lines = [(f"{r['path']}: {r['layout']} layout{weights}, {r['tensors']} tensors, "
              f"{r['parameters'] / 1e9:.3f} B params, {r['file_bytes'] / 2**30:.2f} GiB"),
             (f"  dim {c['dim']}, layers {c['n_layers']}, heads {c['n_heads']}/{c['n_kv_heads']} x {c['head_dim']}, "
              f"experts {c['n_experts']} (top-{c['n_experts_per_tok']}) x ffn {c['hidden_dim']}, vocab "
              f"{c['vocab_size']}, rope_theta {c['rope_theta']:g}"),
             "  types: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items())),
             f"  tokenizer: {_tokenizer_words(r)}, chat template: {'yes' if r['chat_template'] else 'no'}"]
    lines += _quant_line(r["layout"], r["info"])
    lines += _chat_line(r["chat_template_check"])
    lines += [f"  problem: {p}" for p in r["problems"]] or ["  no problems found"]
    return "\n".join(lines)


def _chat_line(check: dict | None) -> list[str]:
    if check is None:
        return []
    if check["reproduces_mistral_common"]:
        return [f"  chat template: reproduces mistral-common's token ids on all {check['conversations']} conversations"]
    return ["  chat template: differs from mistral-common at " + describe_difference(check["first_difference"])]


def _tokenizer_words(r: dict) -> str:
    if not r["tokenizer"]:
        return "no"
    if r.get("tokenizer_file") == "tokenizer.json":
        return "tokenizer.json only (tokenized through the tokenizers library)"
    return "yes"


def _quant_line(layout: str, info: dict) -> list[str]:
    """Quantized HF-style checkpoints: the format (GPTQ's packing, compressed-tensors' format, bitsandbytes'
    type), the tensor naming found and the tool that probably wrote it (from what the files say)."""
    if "tensor_names" not in info:
        return []
    if layout != "gptq":
        return [(f"  {layout}: format {info.get('format')} ({info.get('outtype')}), tensor names "
                 f"{info['tensor_names']} (router {info.get('router_name')}), written by "
                 f"{info.get('written_by') or 'an unnamed tool'}")]
    return [(f"  gptq: checkpoint_format {info.get('checkpoint_format')}, tensor names {info['tensor_names']} "
            f"(router {info.get('router_name')}), written by {info.get('written_by') or 'an unnamed tool'}")]
