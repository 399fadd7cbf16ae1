"""Mistral release layout: params.json + consolidated.safetensors or consolidated.00.pth (torch pickle).

Also reads (not writes) the concatenated-experts variant converted by transformers' old script: several
consolidated.0X.pt with `layers.i.block_sparse_moe.w1|w2|w3` of [E*F, D], w2 stored transposed per expert.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..core import names
from ..core.errors import FormatError, ShapeError, UnsafePickleError
from ..core.names import NameTable
from ..core.spec import DEFAULT_ROPE_THETA, ModelSpec, require_moe, spec_of
from ..core.tensors import FLOAT_DTYPES, Checkpoint, LazyTensor
from ..core.tokenizer import Tokenizer
from ..core.transforms import meta_to_hf_rope, rope_heads, transpose
from ..core.values import ConfigValues
from ..io.buffers import POOL, cast_for_write, load_meta_order
from ..io.files import release_pages
from ..io.hf_dir import read_json, read_tensors, spec_from_config, write_json
from ..io.overlap import prefetched
from ..io.safetensors import SafetensorsWriter
from . import Layout, WriteOptions, register

# mistral-inference's names (docs/FORMATS.md, section 2).
TABLE = NameTable({
    "token_embd": "tok_embeddings.weight",
    "attn_norm": "layers.{i}.attention_norm.weight",
    "attn_q": "layers.{i}.attention.wq.weight",
    "attn_k": "layers.{i}.attention.wk.weight",
    "attn_v": "layers.{i}.attention.wv.weight",
    "attn_output": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "ffn_gate_inp": "layers.{i}.feed_forward.gate.weight",
    "ffn_gate": "layers.{i}.feed_forward.experts.{e}.w1.weight",
    "ffn_down": "layers.{i}.feed_forward.experts.{e}.w2.weight",
    "ffn_up": "layers.{i}.feed_forward.experts.{e}.w3.weight",
    "output_norm": "norm.weight",
    "output": "output.weight",
})
# transformers' convert_mixtral_weights_to_hf.py input: experts concatenated on rows, router under block_sparse_moe.
CONCAT_TABLE = NameTable({**TABLE.rows,
                          "ffn_gate_inp": "layers.{i}.block_sparse_moe.gate.weight",
                          "ffn_gate": "layers.{i}.block_sparse_moe.w1",
                          "ffn_down": "layers.{i}.block_sparse_moe.w2",
                          "ffn_up": "layers.{i}.block_sparse_moe.w3"})


def spec_from_params(p: dict, source) -> ModelSpec:
    """params.json: the Mistral spelling, or the HF spelling the concatenated variant uses."""
    c = ConfigValues(p, source)
    if "hidden_size" in p:
        return spec_from_config({"model_type": "mixtral", **p}, source)
    moe = c.section("moe")
    require_moe(moe.obj.get("num_experts"), source)
    dim, n_heads = c.count("dim"), c.count("n_heads")
    return spec_of(source, dim=dim, n_layers=c.count("n_layers"), n_heads=n_heads,
                   n_kv_heads=c.count("n_kv_heads", n_heads), head_dim=c.count("head_dim", dim // n_heads),
                   hidden_dim=c.count("hidden_dim"), n_experts=moe.count("num_experts"),
                   n_experts_per_tok=moe.count("num_experts_per_tok"), vocab_size=c.count("vocab_size"),
                   norm_eps=c.real("norm_eps", 1e-5), rope_theta=c.real("rope_theta", DEFAULT_ROPE_THETA))


def params_from_spec(spec: ModelSpec) -> dict:
    return {"dim": spec.dim, "n_layers": spec.n_layers, "head_dim": spec.head_dim, "hidden_dim": spec.hidden_dim,
            "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "norm_eps": spec.norm_eps,
            "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta,
            "moe": {"num_experts_per_tok": spec.n_experts_per_tok, "num_experts": spec.n_experts}}


def weight_files(path: Path) -> list[Path]:
    if (path / "consolidated.safetensors").exists():
        return [path / "consolidated.safetensors"]
    return sorted(path.glob("consolidated.*.pth")) + sorted(path.glob("consolidated.*.pt"))


def is_mistral(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").exists() and bool(weight_files(path))


def load_pickle(path: Path) -> dict:
    """A torch pickle, memory-mapped, refusing anything but tensors (no pickled code is ever run). A damaged file
    can fail inside torch in many ways (zip, pickle, storage records); each is this file's format error. Every
    tensor must lie inside its own storage record, so no later read reaches past what the file holds."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"refused: the pickle holds more than tensors ({_first_line(exc, -1)})",
                                file=path) from None
    except Exception as exc:  # noqa: BLE001 - torch.load's failure modes on damaged bytes are not enumerable
        raise FormatError(f"not a readable torch checkpoint ({type(exc).__name__}: {_first_line(exc, 0)})",
                          file=path) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise FormatError("torch checkpoint is not a flat dict of named tensors", file=path)
    size = path.stat().st_size
    for key, t in sd.items():
        span = t.numel() and (t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1)
        if span * t.element_size() > t.untyped_storage().nbytes() or t.numel() * t.element_size() > size:
            raise FormatError(f"tensor {list(t.shape)} does not fit its storage", file=path, tensor=key)
    return sd


def _first_line(exc: Exception, which: int) -> str:
    lines = str(exc).splitlines() or [""]
    return lines[which][:120]


def _pickle_lazy(path: Path, sd: dict, key: str) -> LazyTensor:
    def load():
        t = sd[key]
        copy = t.clone()
        release_pages(t)
        return copy
    return LazyTensor(key, tuple(sd[key].shape), sd[key].dtype, load, str(path))


def _raw_tensors(files: list[Path]) -> tuple[dict, list]:
    """Every stored tensor under its own name, lazily (a name stored in two files is an error)."""
    if files[0].suffix == ".safetensors":
        out, opened = read_tensors(files, NameTable({}))
        return out, [f.close for f in opened]
    out = {}
    for f in files:
        sd = load_pickle(f)
        for k in sd:
            if k in out:
                raise FormatError(f"stored twice (also in {Path(out[k].source).name})", file=f, tensor=k)
            out[k] = _pickle_lazy(f, sd, k)
    return out, []


def _to_canonical(raw: dict, table: NameTable, spec: ModelSpec) -> dict:
    """Rename, un-permute q/k and split concatenated experts into canonical lazy tensors."""
    out = {}
    for key, lazy in raw.items():
        hit = table.to_canonical(key)
        if hit is None:
            out[key] = lazy
            continue
        name, stacked = hit
        if stacked:
            out.update(_split_experts(lazy, name, spec))
            continue
        heads = rope_heads(names.parse(name)[0].key, spec)
        out[name] = lazy.map(lambda w, h=heads: meta_to_hf_rope(w, h), name) if heads else lazy.renamed(name)
    return out


def _split_experts(lazy: LazyTensor, template: str, spec: ModelSpec) -> dict:
    """[E*F, D] rows -> one tensor per expert; w2's blocks are stored transposed ([F, D] -> [D, F])."""
    f = spec.hidden_dim
    if len(lazy.shape) != 2 or lazy.shape[0] != spec.n_experts * f:
        raise ShapeError(f"concatenated experts {list(lazy.shape)} are not [{spec.n_experts} experts x {f}, dim]",
                         lazy.source, lazy.name)
    is_w2 = names.parse(names.fill(template, 0, 0))[0].key == "ffn_down"
    out = {}
    for e in range(spec.n_experts):
        name = template.replace("{e}", str(e))
        fn = (lambda w, e=e: transpose(w[e * f:(e + 1) * f])) if is_w2 else (lambda w, e=e: w[e * f:(e + 1) * f]
                                                                              .contiguous())
        shape = (lazy.shape[1], f) if is_w2 else (f, lazy.shape[1])
        out[name] = lazy.map(fn, name, shape)
    return out


def read(path: Path) -> Checkpoint:
    spec = spec_from_params(read_json(path / "params.json"), path / "params.json")
    raw, closers = _raw_tensors(weight_files(path))
    try:
        concat = any(k.endswith("block_sparse_moe.w1") for k in raw)
        tensors = _to_canonical(raw, CONCAT_TABLE if concat else TABLE, spec)
        tok = Tokenizer.from_file(path / "tokenizer.model") if (path / "tokenizer.model").exists() else None
    except BaseException:
        for c in closers:
            c()
        raise
    ckpt = Checkpoint(spec, tensors, "mistral-concat" if concat else "mistral", path, tok)
    ckpt.closers += closers
    return ckpt


def to_layout(t: LazyTensor, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    return cast_for_write(load_meta_order(t, spec), dtype)


def write(ckpt: Checkpoint, out: Path, opts: WriteOptions) -> None:
    dtype = FLOAT_DTYPES[opts.outtype]
    tensors = ckpt.ordered()
    plan = [(TABLE.to_layout(t.name)[0], dtype, t.shape) for t in tensors]
    w = SafetensorsWriter(out / "consolidated.safetensors", plan)
    jobs = (lambda t=t: to_layout(t, ckpt.spec, dtype) for t in tensors)
    for (name, _, _), data in zip(plan, prefetched(jobs)):
        opts.progress(w.write(name, data))
        POOL.give(data)
    w.close()
    write_json(out / "params.json", params_from_spec(ckpt.spec))
    (out / "tokenizer.model").write_bytes((ckpt.tokenizer or Tokenizer.default()).sp_model)


register(Layout("mistral", is_mistral, read, write))
