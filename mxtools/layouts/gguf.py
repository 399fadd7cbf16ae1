"""GGUF layout as llama.cpp runs Mixtral (`general.architecture = llama`, merged 3-D expert tensors).

Reads current files and the legacy per-expert ones (Dec 2023 - Apr 2024), in every tensor type gguf-py can
dequantize; writes F32/F16/BF16 and block quants, one source tensor (one expert slab) at a time.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from ..core import names
from ..core.errors import FormatError, NonFiniteError, NotMixtralError, ShapeError, reading
from ..core.spec import ModelSpec, spec_of
from ..core.tensors import Checkpoint, LazyTensor, require_finite
from ..core.tokenizer import Tokenizer
from ..core.transforms import meta_to_hf_rope, rope_heads
from ..core.values import REQUIRED, meta_value, show
from ..io.buffers import POOL, cast_for_write, load_meta_order
from ..io.files import RawFile
from ..io.gguf_format import MAGIC, tensor_nbytes
from ..io.gguf_reader import TensorInfo, read_header
from ..io.gguf_tables import (
    ARCH,
    FLOAT_TYPES,
    LEGACY_TABLE,
    OUTTYPE_FILE_TYPE,
    TABLE,
    key,
)
from ..io.gguf_writer import GGUFStreamWriter
from ..io.overlap import prefetched
from ..native import NonFiniteRow
from . import Layout, WriteOptions, register

# ---- reading ----

def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _f32(x: float) -> float:
    """GGUF keeps f32: read back the shortest decimal that float32 value stands for (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


K, LLM, ATT, ROPE, TOK = gguf.Keys.General, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope, gguf.Keys.Tokenizer


def spec_from_metadata(m: dict, source) -> ModelSpec:
    arch, n_experts = m.get(K.ARCHITECTURE), key(LLM.EXPERT_COUNT)
    if arch != ARCH or not m.get(n_experts):
        experts = m.get(n_experts, 0) if arch == ARCH else 0
        raise NotMixtralError(f"not a Mixtral GGUF (architecture {show(arch, 60)}, {show(experts, 60)} experts)",
                              file=source)

    def get(template, kind=int, default=REQUIRED):
        return meta_value(m, key(template), kind, source, default)
    dim, n_heads = get(LLM.EMBEDDING_LENGTH), get(ATT.HEAD_COUNT)
    return spec_of(
        source, dim=dim, n_layers=get(LLM.BLOCK_COUNT), n_heads=n_heads,
        n_kv_heads=get(ATT.HEAD_COUNT_KV, int, n_heads),
        head_dim=get(ATT.KEY_LENGTH, int, None) or get(ROPE.DIMENSION_COUNT, int, None)
        or (dim // n_heads if n_heads > 0 else 0),
        hidden_dim=get(LLM.FEED_FORWARD_LENGTH), n_experts=get(LLM.EXPERT_COUNT),
        n_experts_per_tok=get(LLM.EXPERT_USED_COUNT),
        vocab_size=get(LLM.VOCAB_SIZE, int, None) or len(meta_value(m, TOK.LIST, list, source)),
        norm_eps=_f32(get(ATT.LAYERNORM_RMS_EPS, float, 1e-5)),
        rope_theta=_f32(get(ROPE.FREQ_BASE, float, 10000.0)),  # llama.cpp's default when the key is absent
        context_length=get(LLM.CONTEXT_LENGTH, int, 32768),
        name=meta_value(m, K.NAME, str, source, "") or "mixtral")


# the fewest bits any GGML type spends on one weight (IQ1_S: 1.5625)
_MIN_BITS = min(8 * size / block for block, size in gguf.GGML_QUANT_SIZES.values())


def check_fits(spec: ModelSpec, raw: RawFile) -> None:
    """Refuse a spec whose weights could not fit in the file even at the smallest GGML type, before anything
    (the list of tensor names, per-expert handles) is sized from it."""
    n = sum(math.prod(k.shape(spec)) * (spec.n_layers if k.scope != "global" else 1)
            * (spec.n_experts if k.scope == "expert" else 1) for k in names.KINDS)
    if n * _MIN_BITS / 8 > raw.size:
        raise FormatError(f"metadata describes a model of {n} weights, more than the file's {raw.size} bytes "
                          "can hold", file=raw.path)


def tokenizer_from_metadata(m: dict, source, vocab_size: int) -> Tokenizer | None:
    if TOK.LIST not in m:
        return None

    def get(k, kind, default=REQUIRED):
        return meta_value(m, k, kind, source, default)
    if len(get(TOK.LIST, list)) > vocab_size:  # ids the model has no embedding for
        raise FormatError(f"the tokenizer has {len(get(TOK.LIST, list))} tokens, more than the model's "
                          f"vocabulary of {vocab_size}", file=source)
    return Tokenizer.from_vocab(
        get(TOK.LIST, list), get(TOK.SCORES, list), get(TOK.TOKEN_TYPE, list), source=source,
        chat_template=get(TOK.CHAT_TEMPLATE, str, None), bos_id=get(TOK.BOS_ID, int, 1),
        eos_id=get(TOK.EOS_ID, int, 2), unk_id=get(TOK.UNK_ID, int, 0),
        add_bos=get(TOK.ADD_BOS, bool, True), add_eos=get(TOK.ADD_EOS, bool, False))


def _loader(raw: RawFile, name: str, offset: int, shape: tuple, qtype: Q) -> Callable[[], torch.Tensor]:
    nbytes = tensor_nbytes(shape, qtype)
    if qtype in FLOAT_TYPES:
        return lambda: raw.read_tensor(offset, nbytes, FLOAT_TYPES[qtype], shape, name)
    row_bytes = tensor_nbytes(shape[-1:], qtype)

    def load() -> torch.Tensor:
        data = raw.read(offset, nbytes, name).reshape(-1, row_bytes)
        # gguf-py cannot dequantize every type id the format defines; NaN/inf scales are data (inspect lists
        # them), not a warning on stderr
        with reading(raw.path, name), np.errstate(all="ignore"):
            return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(shape))
    return load


def _lazy(raw: RawFile, t: TensorInfo, canonical: str, spec: ModelSpec, slab: int | None) -> LazyTensor:
    shape, offset = t.shape, t.offset
    if slab is not None:
        shape = shape[1:]
        offset += slab * tensor_nbytes(shape, t.qtype)
    lazy = LazyTensor(canonical, shape, FLOAT_TYPES.get(t.qtype, torch.float32),
                      _loader(raw, t.name, offset, shape, t.qtype), raw.path,
                      "" if t.qtype in FLOAT_TYPES else t.qtype.name)
    heads = rope_heads(names.parse(canonical)[0].key, spec)
    if not heads or tuple(shape) != names.expected_shape(canonical, spec):
        return lazy  # a misshapen tensor is reported by Checkpoint.problems(), its data left as stored
    return lazy.map(lambda w: meta_to_hf_rope(w, heads))


def _canonical_tensors(raw: RawFile, infos: list[TensorInfo], spec: ModelSpec) -> tuple[dict, bool]:
    legacy = any(".ffn_gate.0." in t.name for t in infos)
    table = LEGACY_TABLE if legacy else TABLE
    tensors = {}
    for t in infos:
        hit = table.to_canonical(t.name)
        if hit is None:
            tensors[t.name] = LazyTensor(t.name, t.shape, torch.float32, None, raw.path)
        elif hit[1]:
            if len(t.shape) != 3 or t.shape[0] != spec.n_experts:
                raise ShapeError(f"merged expert tensor has shape {list(t.shape)}, expected "
                                 f"[{spec.n_experts}, rows, columns]", file=raw.path, tensor=t.name)
            for e in range(t.shape[0]):
                name = hit[0].replace("{e}", str(e))
                tensors[name] = _lazy(raw, t, name, spec, e)
        else:
            tensors[hit[0]] = _lazy(raw, t, hit[0], spec, None)
    return tensors, legacy


def read(path: Path) -> Checkpoint:
    raw = RawFile(path)
    try:
        with reading(path):
            meta, infos = read_header(raw)
            spec = spec_from_metadata(meta, path)
            check_fits(spec, raw)
            tensors, legacy = _canonical_tensors(raw, infos, spec)
            tokenizer = tokenizer_from_metadata(meta, path, spec.vocab_size)
            file_type = meta_value(meta, K.FILE_TYPE, int, path, None)
    except BaseException:
        raw.close()
        raise
    info = {"file_type": file_type, "legacy_experts": legacy}
    ckpt = Checkpoint(spec, tensors, "gguf", path, tokenizer, info)
    ckpt.closers.append(raw.close)
    return ckpt


# ---- writing ----

def uniform_policy(qtype: Q) -> Callable:
    """Every tensor in `qtype` but those llama.cpp keeps F32 (names.gguf_f32: norms, router)."""
    def policy(kind_key: str, layer, np_shape) -> Q:
        return Q.F32 if names.gguf_f32(kind_key, np_shape) else qtype
    return policy


def metadata(w: GGUFStreamWriter, spec: ModelSpec, tok: Tokenizer, file_type: int, name: str) -> None:
    u32 = V.UINT32
    rows = [(K.ARCHITECTURE, V.STRING, ARCH), (K.NAME, V.STRING, name),
            (key(LLM.CONTEXT_LENGTH), u32, spec.context_length), (key(LLM.EMBEDDING_LENGTH), u32, spec.dim),
            (key(LLM.BLOCK_COUNT), u32, spec.n_layers), (key(LLM.FEED_FORWARD_LENGTH), u32, spec.hidden_dim),
            (key(ROPE.DIMENSION_COUNT), u32, spec.head_dim), (key(ATT.HEAD_COUNT), u32, spec.n_heads),
            (key(ATT.HEAD_COUNT_KV), u32, spec.n_kv_heads),
            (key(ATT.LAYERNORM_RMS_EPS), V.FLOAT32, spec.norm_eps),
            (key(ROPE.FREQ_BASE), V.FLOAT32, spec.rope_theta), (key(LLM.EXPERT_COUNT), u32, spec.n_experts),
            (key(LLM.EXPERT_USED_COUNT), u32, spec.n_experts_per_tok),
            (K.FILE_TYPE, u32, int(file_type)), (key(LLM.VOCAB_SIZE), u32, spec.vocab_size)]
    if spec.head_dim * spec.n_heads != spec.dim:
        rows += [(key(ATT.KEY_LENGTH), u32, spec.head_dim), (key(ATT.VALUE_LENGTH), u32, spec.head_dim)]
    rows.append((K.QUANTIZATION_VERSION, u32, gguf.GGML_QUANT_VERSION))
    for k, vtype, value in rows:
        w.add(k, vtype, value)
    _tokenizer_metadata(w, tok)


def _tokenizer_metadata(w: GGUFStreamWriter, tok: Tokenizer) -> None:
    tokens, scores, types = tok.vocab()
    w.add(TOK.MODEL, V.STRING, "llama")  # SentencePiece
    w.add(TOK.PRE, V.STRING, "default")
    w.add(TOK.LIST, V.ARRAY, tokens, V.STRING)
    w.add(TOK.SCORES, V.ARRAY, scores, V.FLOAT32)
    w.add(TOK.TOKEN_TYPE, V.ARRAY, types, V.INT32)
    for k, value in ((TOK.BOS_ID, tok.bos_id), (TOK.EOS_ID, tok.eos_id), (TOK.UNK_ID, tok.unk_id)):
        w.add(k, V.UINT32, value)
    w.add(TOK.ADD_BOS, V.BOOL, tok.add_bos)
    w.add(TOK.ADD_EOS, V.BOOL, tok.add_eos)
    if tok.chat_template:
        w.add(TOK.CHAT_TEMPLATE, V.STRING, tok.chat_template)


def plan(ckpt: Checkpoint) -> list[tuple[str, list[LazyTensor], tuple]]:
    """(gguf name, canonical tensors in write order, numpy shape); experts of a layer merge into one tensor."""
    out = []
    for t in ckpt.ordered():
        gname, slab = TABLE.to_layout(t.name)
        if slab is None:
            out.append((gname, [t], tuple(t.shape)))
        elif slab == 0:
            out.append((gname, [t], None))
        else:
            out[-1][1].append(t)
    return [(g, ts, shape or (len(ts), *ts[0].shape)) for g, ts, shape in out]


def encode(w: torch.Tensor, qtype: Q, imatrix=None) -> np.ndarray:
    """A tensor as the bytes GGUF stores for `qtype`, in a buffer from POOL (w's own for a float type).

    Consumes w: its buffer is reused or given back to POOL, so the caller must hold the only reference.
    Block quantizers read bf16/f16 rows directly: no float32 copy of the matrix is made."""
    if qtype in FLOAT_TYPES:
        return cast_for_write(w, FLOAT_TYPES[qtype]).view(torch.uint8).numpy()
    from ..io.ggml_blocks import quantize
    rows, n = w.reshape(-1, w.shape[-1]).shape
    row_bytes = tensor_nbytes((n,), qtype)
    out = quantize(w.reshape(rows, n), qtype, imatrix, out=POOL.take(rows * row_bytes).reshape(rows, row_bytes))
    POOL.give(w)
    return out


def _job(t: LazyTensor, spec: ModelSpec, qtype: Q, imatrix: dict | None, finite: bool):
    """Load, reorder and encode one tensor; `finite`: refuse NaN and inf (a block-quantized output), which the C
    encoders detect in the block-quantized tensors and this checks in the float ones (norms, router)."""
    def job():
        w = load_meta_order(t, spec)
        if finite and qtype in FLOAT_TYPES:
            require_finite(w, t, "a block-quantized GGUF")
        try:
            return encode(w, qtype, (imatrix or {}).get(t.name))
        except NonFiniteRow as exc:
            raise NonFiniteError(f"row {exc.row} holds NaN or infinite values; {qtype.name} cannot represent them",
                                 t.source, t.name) from None
    return job


def _given(encoded, t: LazyTensor, qtype: Q, job):
    """`job`, unless `encoded` (write's argument) has the tensor's bytes already."""
    if encoded is None:
        return job

    def given():
        data = encoded(t, qtype)
        return job() if data is None else data
    return given


def write(ckpt: Checkpoint, out: Path, opts: WriteOptions) -> None:
    """Write `ckpt` as one GGUF file. `opts.policy(kind, layer, np_shape) -> type` picks each tensor's type;
    `opts.extra_metadata`: more (key, GGUFValueType, value) rows, e.g. the quantize.imatrix.* keys;
    `opts.encoded(tensor, type)`: the bytes of a canonical tensor (one expert slab) already in `type` and GGUF row
    order, or None to encode it here (quantize --to gguf hands over its GPTQ results this way)."""
    outtype, file_type, imatrix, encoded = opts.outtype, opts.file_type, opts.imatrix, opts.encoded
    policy = opts.policy or uniform_policy(Q[outtype.upper()])
    w = GGUFStreamWriter(out)
    metadata(w, ckpt.spec, ckpt.tokenizer or Tokenizer.default(),
             OUTTYPE_FILE_TYPE[outtype] if file_type is None else file_type, ckpt.spec.name)
    for k, vtype, value in opts.extra_metadata:
        w.add(k, vtype, value)
    jobs = []
    for gname, tensors, shape in plan(ckpt):
        kind, layer, _ = names.parse(tensors[0].name)
        qtype = policy(kind.key, layer, shape)
        w.plan(gname, shape, qtype)
        jobs += [_given(encoded, t, qtype, _job(t, ckpt.spec, qtype, imatrix, outtype not in OUTTYPE_FILE_TYPE))
                 for t in tensors]
    w.write_header()
    for data in prefetched(jobs):
        opts.progress(w.write(data))
        POOL.give(data)
    w.close()


register(Layout("gguf", is_gguf, read, write, output_is_dir=False))
