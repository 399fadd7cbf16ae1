"""Hugging Face layout: config.json + sharded safetensors (+ index) + SentencePiece tokenizer files (the directory
itself: io/hf_dir.py)."""
from __future__ import annotations

from pathlib import Path

from ..core.names import CANONICAL_TABLE
from ..core.tensors import FLOAT_DTYPES, Checkpoint
from ..io.buffers import cast_for_write
from ..io.hf_dir import (
    config_from_spec,
    first_shard_keys,
    gptq_quant_config,
    quant_config,
    read_dir,
    write_json,
    write_shards,
    write_tokenizer,
)
from ..io.overlap import prefetched
from . import Layout, WriteOptions, register

# transformers' MixtralForCausalLM state dict names (docs/FORMATS.md, section 1): the canonical naming itself.
TABLE = CANONICAL_TABLE


def is_hf(path: Path) -> bool:
    keys = first_shard_keys(path)
    return keys is not None and not any(k.startswith("mixtral.") for k in keys) and gptq_quant_config(path) is None \
        and quant_config(path) is None


def read(path: Path) -> Checkpoint:
    return read_dir(path, TABLE, "hf")


def write(ckpt: Checkpoint, out: Path, opts: WriteOptions) -> None:
    dtype = FLOAT_DTYPES[opts.outtype]
    tensors = ckpt.ordered()
    jobs = (lambda t=t: cast_for_write(t.load(), dtype) for t in tensors)
    write_shards(out, [(t.name, dtype, t.shape) for t in tensors], prefetched(jobs), opts.shard_bytes,
                 {"format": "pt"}, opts.progress)
    write_json(out / "config.json", config_from_spec(ckpt.spec, dtype))
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    write_tokenizer(ckpt.tokenizer, out)


register(Layout("hf", is_hf, read, write))
