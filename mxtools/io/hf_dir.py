"""An HF-style model directory, the files the HF, GPTQ and Paddle layouts share: config.json <-> ModelSpec,
sharded safetensors (+ model.safetensors.index.json) read through a layout's NameTable and written in order, and
the SentencePiece tokenizer files (tokenizer.model, tokenizer_config.json, tokenizer.json, chat_template.jinja).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import FormatError, MxError, NotMixtralError
from ..core.expert_names import canonical_key, name_table, naming_of
from ..core.names import NameTable
from ..core.spec import DEFAULT_ROPE_THETA, ModelSpec, require_moe, spec_of
from ..core.tensors import Checkpoint, dense_nbytes
from ..core.tokenizer import Tokenizer
from ..core.tokenizer_json import JsonTokenizer
from ..core.values import ConfigValues, is_kind, json_object
from .buffers import POOL
from .safetensors import SafetensorsFile, SafetensorsWriter

TOKENIZER_FILES = ("tokenizer.model", "sentencepiece.bpe.model")  # the second is the PaddleNLP mirror's name
FAST_TOKENIZER_FILE = "tokenizer.json"  # read when no SentencePiece model is there (GPTQModel, AutoRound outputs)
QUANT_CONFIG_FILE = "quantize_config.json"  # AutoGPTQ / GPTQModel's copy of the quantization config


# ---- config.json ----

def spec_from_config(cfg: dict, source) -> ModelSpec:
    """config.json in the transformers 4.x spelling (rope_theta) or 5.x (rope_parameters, head_dim null)."""
    c = ConfigValues(cfg, source)
    archs = cfg.get("architectures")
    archs = archs if is_kind(archs, list) else []
    if cfg.get("model_type") != "mixtral" and not any(is_kind(a, str) and "Mixtral" in a for a in archs):
        raise NotMixtralError(f"not a Mixtral model (model_type {cfg.get('model_type')!r:.40})", file=source)
    require_moe(cfg.get("num_local_experts"), source)
    dim, n_heads = c.count("hidden_size"), c.count("num_attention_heads")
    rope = c.section("rope_parameters")
    theta = c.real("rope_theta") if c.has("rope_theta") else rope.real("rope_theta", DEFAULT_ROPE_THETA)
    return spec_of(
        source, dim=dim, n_layers=c.count("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=c.count("num_key_value_heads", n_heads), head_dim=c.count("head_dim", dim // n_heads),
        hidden_dim=c.count("intermediate_size"), n_experts=c.count("num_local_experts"),
        n_experts_per_tok=c.count("num_experts_per_tok"), vocab_size=c.count("vocab_size"),
        norm_eps=c.real("rms_norm_eps", 1e-5), rope_theta=theta,
        context_length=c.count("max_position_embeddings", 32768), name=c.text("_name_or_path", "") or "mixtral")


def config_from_spec(spec: ModelSpec, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": spec.dim, "intermediate_size": spec.hidden_dim, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "num_local_experts": spec.n_experts, "num_experts_per_tok": spec.n_experts_per_tok,
        "vocab_size": spec.vocab_size, "rms_norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.context_length, "sliding_window": None, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "output_router_logits": False, "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0, "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_json(path) -> dict | list | str | int | float | bool | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"cannot read JSON: {str(exc)[:200]}", file=path) from None


def read_json_object(path, what: str = "file") -> dict:
    return json_object(read_json(path), what, path)


def _shard_name(name, index: Path, suffix: str) -> str:
    """A weight_map entry must name a file beside the index (no directories, no way out of the checkpoint)."""
    if not is_kind(name, str) or not name.endswith(suffix) or "/" in name or "\\" in name \
            or name.startswith("."):
        raise FormatError(f"index weight_map names {str(name)[:80]!r}, not a {suffix} file beside it",
                          file=index)
    return name


def shard_files(path: Path, index_name: str = "model.safetensors.index.json",
                suffix: str = ".safetensors") -> list[Path]:
    """The shards an index names (`index_name`, files ending in `suffix`), else every `*suffix` file."""
    index = path / index_name
    if index.exists():
        weight_map = read_json_object(index, "index").get("weight_map")
        if not is_kind(weight_map, dict) or not weight_map:
            raise FormatError("index has no weight_map object, or an empty one", file=index)
        return [path / f for f in sorted({_shard_name(v, index, suffix) for v in weight_map.values()})]
    return sorted(path.glob("*" + suffix))


def read_tokenizer(path: Path) -> Tokenizer | None:
    """The directory's tokenizer.model (or its Paddle name), else its tokenizer.json (read through the tokenizers
    library), with tokenizer_config.json's settings; None when it has neither."""
    model = next((path / n for n in TOKENIZER_FILES if (path / n).exists()), None)
    if model is None and not (path / FAST_TOKENIZER_FILE).exists():
        return None
    cfg_file = path / "tokenizer_config.json"
    cfg = read_json_object(cfg_file, "tokenizer config") if cfg_file.exists() else {}
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").exists():
        template = _read_text(path / "chat_template.jinja")
    add_bos, add_eos = cfg.get("add_bos_token", True), cfg.get("add_eos_token", False)
    if not (template is None or is_kind(template, str)) or not is_kind(add_bos, bool) or not is_kind(add_eos, bool):
        raise FormatError("chat_template must be a string and add_bos_token/add_eos_token booleans", file=cfg_file)
    if model is None:
        specials = {k: _token_text(cfg.get(f"{k}_token"), d)
                    for k, d in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"))}
        return JsonTokenizer.from_json_file(path / FAST_TOKENIZER_FILE, chat_template=template, add_bos=add_bos,
                                            add_eos=add_eos, bos_token=specials["bos"], eos_token=specials["eos"],
                                            unk_token=specials["unk"])
    return Tokenizer.from_file(model, chat_template=template, add_bos=add_bos, add_eos=add_eos)


def _token_text(value, default: str):
    """A special token of tokenizer_config.json: a string, or transformers' AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return default if value is None else value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read text: {str(exc)[:200]}", file=path) from None


def read_tensors(files, table: NameTable, transform=None, opener=SafetensorsFile) -> tuple[dict, list]:
    """Lazy tensors of every shard (opened by `opener`) mapped to canonical names; unknown keys kept under their
    own name. A tensor stored twice (in two shards) is an error; on any error every shard opened so far is
    closed."""
    tensors, opened = {}, []
    try:
        for f in files:
            st = opener(f)
            opened.append(st)
            for key in st.keys():
                hit = table.to_canonical(key)
                lazy = st.lazy(key, hit[0] if hit else key)
                if lazy.name in tensors:
                    raise FormatError(f"stored twice (also in {Path(tensors[lazy.name].source).name})",
                                      file=f, tensor=key)
                tensors[lazy.name] = transform(lazy) if (transform and hit) else lazy
    except BaseException:
        for st in opened:
            st.close()
        raise
    return tensors, opened


def first_shard_keys(path: Path, opener=SafetensorsFile) -> set[str] | None:
    """Tensor names of the first shard of an HF-style directory (None when it is not one)."""
    if not (path.is_dir() and (path / "config.json").exists()):
        return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    try:
        st = opener(files[0])
    except FormatError:
        return set()  # the reader reports the corrupt shard
    st.close()
    return set(st.keys())

def gptq_quant_config(path: Path) -> dict | None:
    """The GPTQ quantization config of an HF-style directory, or None when it is not a GPTQ checkpoint."""
    cfg_file = path / "config.json"
    if not (path.is_dir() and cfg_file.exists()):
        return None
    try:
        qc = read_json(cfg_file).get("quantization_config")
        if is_kind(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq":
            return qc
        if (path / QUANT_CONFIG_FILE).exists():
            qc = read_json(path / QUANT_CONFIG_FILE)
            return qc if is_kind(qc, dict) else None
    except (MxError, AttributeError):
        return None  # a corrupt config: the plain HF reader reports it
    return None


# quant_method values of config.json's quantization_config that a quantized layout reads (the HF layout does not)
QUANT_METHODS = ("gptq", "compressed-tensors", "bitsandbytes")


def quant_config(path: Path, method: str | None = None) -> dict | None:
    """config.json's quantization_config (or the `compression_config` early llm-compressor versions wrote) when
    its quant_method is `method` (any of QUANT_METHODS when None); None otherwise, and for a directory without a
    readable config (the HF reader reports that)."""
    cfg_file = path / "config.json"
    if not (path.is_dir() and cfg_file.exists()):
        return None
    try:
        cfg = read_json(cfg_file)
    except MxError:
        return None
    qc = (cfg.get("quantization_config") or cfg.get("compression_config")) if is_kind(cfg, dict) else None
    found = str(qc.get("quant_method", "")).lower() if is_kind(qc, dict) else None
    return qc if found in ((method,) if method else QUANT_METHODS) else None


def read_dir(path: Path, table: NameTable, layout: str, transform=None, files=None,
             opener=SafetensorsFile) -> Checkpoint:
    """The checkpoint of an HF-style directory whose tensors `table` names (`transform`: applied to each named
    lazy tensor), labelled `layout`; `files` (default: its safetensors shards) opened by `opener`."""
    spec = spec_from_config(read_json(path / "config.json"), path / "config.json")
    files = shard_files(path) if files is None else files
    if not files:
        raise FormatError("no .safetensors files", file=path)
    tok = read_tokenizer(path)  # before any shard is opened: nothing to close if it fails
    tensors, opened = read_tensors(files, table, transform, opener)
    ckpt = Checkpoint(spec, tensors, layout, path, tok)
    ckpt.closers += [f.close for f in opened]
    return ckpt


# ---- writing ----

def plan_shards(items: list[tuple[str, torch.dtype, tuple]], shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for item in items:
        n = dense_nbytes(item[2], item[1])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def write_shards(out: Path, items: list[tuple[str, torch.dtype, tuple]], data, shard_bytes: int,
                 metadata: dict, progress=lambda n: None) -> None:
    """Write `items` (name, dtype, shape), whose tensors `data` yields in order, as HF shards (+ index)."""
    shards, total, weight_map = plan_shards(items, shard_bytes), 0, {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(out / fname, shard, metadata)
        for name, _, _ in shard:
            t = next(data)
            n = w.write(name, t)
            POOL.give(t)
            total += n
            weight_map[name] = fname
            progress(n)
        w.close()
    if len(shards) > 1:
        write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tokenizer(tok: Tokenizer | None, out: Path) -> None:
    tok = tok or Tokenizer.default()
    tok.processor()  # a tokenizer.json of another vocabulary than v1's has no SentencePiece model: refused here
    (out / "tokenizer.model").write_bytes(tok.sp_model)
    write_tokenizer_json(tok, out)
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos, "legacy": True,
           "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    write_json(out / "tokenizer_config.json", cfg)
    write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def write_tokenizer_json(tok: Tokenizer, out: Path) -> None:
    """out/tokenizer.json: the fast tokenizer transformers and vLLM load, built from the SentencePiece model."""
    (out / "tokenizer.json").write_text(json.dumps(tok.hf_json(), ensure_ascii=False), encoding="utf-8")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_decoded(path: Path, decode, opener=SafetensorsFile) -> tuple[dict, str, str, object, list]:
    """What the readers of quantized HF-style directories share: every shard of `path` opened lazily (`opener`),
    `decode(raw)` turning the stored tensors into {stored name: lazy float tensor}, the expert naming and router
    found from those names, and each tensor renamed to its canonical name. Returns (tensors, naming, router,
    tokenizer, closers); on any error every shard opened is closed."""
    files = shard_files(path)
    if not files:
        raise FormatError("no .safetensors files", file=path)
    tok = read_tokenizer(path)  # before any shard is opened: nothing to close if it fails
    raw, opened = read_tensors(files, NameTable({}), opener=opener)
    try:
        tensors = decode(raw)
        naming, router = naming_of(tensors, path)
    except BaseException:
        for f in opened:
            f.close()
        raise
    table = name_table(naming, router)
    renamed = {}
    for key, t in tensors.items():
        name = canonical_key(key, table)
        renamed[name] = t.renamed(name)
    return renamed, naming, router, tok, [f.close for f in opened]
