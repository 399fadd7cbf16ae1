"""Deterministic fuzz of the checkpoint-directory readers: HF shards + index + config.json,
Mistral params.json + consolidated.safetensors / consolidated.00.pth, the concatenated-experts variant, PaddleNLP
and GPTQ. Every mutated input goes through the CLI's error boundary in a forked child (tests/fuzzing.py): it must
end with exit 0, or exit 2 and exactly one `mxtools: error:` line that names a file of the case, never a
traceback, a hang, a signal or a runaway allocation.

The case builders are plain functions (build_sources, cases, run_case) so bench/fuzz.py's long run can use them
with more seeds and counts.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import small_spec, write_concat
from fuzzing import mutate, mutate_field, pickle_fields, pickle_spans, run_isolated
from safetensors.torch import load_file, save_file

from mxtools.commands.convert import write_checkpoint
from mxtools.commands.synth import synth_checkpoint
from mxtools.core import names
from mxtools.layouts import paddle

SEED = 9
PADDLE_FIXTURES = Path(__file__).parent / "fixtures" / "paddle"
REMOVED = object()
# what every config field is replaced by (the list): a word, a float, null, an array, an object, zero,
# negative, 2**40, beyond uint64, and the key removed; also int32's maximum, the largest count a config may
# claim (so the checks must not cost time in the claimed counts)
STRUCTURED = [("string", "word"), ("float", 1.5), ("null", None), ("list", [1]), ("object", {"a": 1}),
              ("zero", 0), ("negative", -1), ("2**31-1", 2**31 - 1), ("2**40", 2**40), ("2**64", 2**64),
              ("removed", REMOVED)]
# (changes to make: file name -> new bytes, or None to delete it)
Changes = dict[str, bytes | None]


# ---------------------------------------------------------------- sources

def _spec(vocab=512, **kw):
    """small_spec with a small vocabulary, so each case copies and reads little (the tokenizer stays the real
    one; nothing a reader checks ties the two)."""
    return small_spec(vocab_size=vocab, **kw)


def build_sources(root: Path) -> dict[str, Path]:
    """One synthetic checkpoint per reader under root: hf (three shards + index), mistral (safetensors),
    mistral-pth, concat (two .pt files), paddle, paddle-pdparams (PaddleNLP's fixture), gptq (RTN int4),
    gptq-autoround (AutoRound's own, a fixture), compressed (llm-compressor's), bnb (transformers + bitsandbytes)."""
    root.mkdir(parents=True, exist_ok=True)
    ck = synth_checkpoint(_spec(), 0, torch.bfloat16)
    out = {"hf": write_checkpoint(ck, "hf", root / "hf", "bf16", shard_bytes=400_000),
           "mistral": write_checkpoint(ck, "mistral", root / "mistral", "bf16")}
    out["mistral-pth"] = _pth(out["mistral"], root / "mistral-pth")
    out["concat"] = write_concat(out["mistral"], root / "concat", _spec())
    out["paddle"] = _paddle(out["hf"], root / "paddle")
    # PaddleNLP's own save_pretrained output (sharded .pdparams pickles + index), as written by Paddle, with the
    # tokenizer file PaddleNLP's LlamaTokenizer saves beside it (verify needs one)
    out["paddle-pdparams"] = Path(shutil.copytree(PADDLE_FIXTURES / "mixtral-sharded", root / "paddle-pdparams"))
    shutil.copy(out["hf"] / "tokenizer.model", out["paddle-pdparams"] / "sentencepiece.bpe.model")
    gptq_spec = _spec(dim=128, hidden_dim=256, head_dim=32)
    out["gptq"] = write_checkpoint(synth_checkpoint(gptq_spec, 0, torch.float16), "gptq", root / "gptq", "f16")
    # another tool's GPTQ checkpoint: AutoRound's expert names, bf16 router, `dynamic` rules, quantization_config.json
    out["gptq-autoround"] = Path(shutil.copytree(AUTOROUND, root / "gptq-autoround"))
    # llm-compressor's compressed-tensors W4A16 (asymmetric, packed zero points) and transformers' bitsandbytes
    # NF4 with nested quantization (quant_state JSON in uint8 tensors), both fixtures, with the tokenizer the tools
    # were given (their fixtures carry none)
    for name, fixture in (("compressed", LLMCOMPRESSOR), ("bnb", BNB)):
        out[name] = Path(shutil.copytree(fixture, root / name))
        shutil.copy(out["hf"] / "tokenizer.model", out[name] / "tokenizer.model")
    return out


def _copy_small_files(src: Path, dst: Path, skip=lambda p: False) -> None:
    dst.mkdir()
    for f in src.iterdir():
        if not skip(f):
            shutil.copy(f, dst / f.name)


def _pth(mistral_dir: Path, dst: Path) -> Path:
    """The Mistral release's .pth spelling: the same tensors in one torch zip pickle."""
    _copy_small_files(mistral_dir, dst, lambda f: f.suffix == ".safetensors")
    torch.save(load_file(mistral_dir / "consolidated.safetensors"), dst / "consolidated.00.pth")
    return dst


def _paddle(hf_dir: Path, dst: Path) -> Path:
    """PaddleNLP: `mixtral.` names, Linear weights stored [in, out], sentencepiece.bpe.model."""
    dst.mkdir()
    shutil.copy(hf_dir / "config.json", dst / "config.json")
    shutil.copy(hf_dir / "tokenizer.model", dst / "sentencepiece.bpe.model")
    sd = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(f))
    save_file({paddle.TABLE.to_layout(n)[0]: (w.t().contiguous() if names.parse(n)[0].linear else w)
               for n, w in sd.items()}, dst / "model_state.safetensors")
    return dst


# ---------------------------------------------------------------- mutations

def safetensors_header_end(data: bytes) -> int:
    """Bytes up to the end of the JSON header (where the mutations go)."""
    return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else len(data)


def zip_metadata_spans(data: bytes) -> list[tuple[int, int]]:
    """The parts of a torch zip pickle that are not tensor data: each member's local header, the small members
    (data.pkl, byteorder, version, ...) whole, and the central directory to the end of the file."""
    import io
    spans = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            at = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])
            body = at + 30 + name_len + extra_len
            spans.append((at, body if "/data/" in info.filename else body + info.compress_size))
        spans.append((z.start_dir, len(data)))
    return spans


def byte_cases(name: str, data: bytes, rng: random.Random, n: int, spans=None) -> Iterator[tuple[str, Changes]]:
    """n seeded byte mutations of file `name` (tests/fuzzing.mutate: flips, random bytes, extreme integers,
    truncation, insertions, deletions), inside `spans` [(start, end)] when given (else anywhere)."""
    spans = spans or [(0, len(data))]
    for k in range(n):
        start, end = rng.choice(spans)
        kind, new = mutate(data[start:], rng, header_end=end - start)
        yield f"{name}:{kind}#{k}", data[:start] + new


def truncation_cases(name: str, data: bytes, rng: random.Random, n: int) -> Iterator[tuple[str, Changes]]:
    for k in range(n):
        cut = rng.randrange(len(data))
        yield f"{name}:truncate@{cut}#{k}", data[:cut]


def _paths(obj, prefix=()) -> Iterator[tuple]:
    """Every key path of a JSON object (nested objects included, and their own keys)."""
    for key, value in obj.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _replaced(obj: dict, path: tuple, value) -> dict:
    obj = json.loads(json.dumps(obj))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if value is REMOVED:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return obj


def structured_cases(name: str, obj: dict, paths=None) -> Iterator[tuple[str, bytes]]:
    """Each key (at every depth, or only `paths`) replaced by each STRUCTURED value, and the file replaced by
    other JSON values than an object."""
    for path in paths or list(_paths(obj)):
        for label, value in STRUCTURED:
            yield f"{name}:{'.'.join(path)}={label}", json.dumps(_replaced(obj, path, value)).encode()
    for label, value in (("array", [obj]), ("null", None), ("number", 7), ("string", "config")):
        yield f"{name}:<{label}>", json.dumps(value).encode()


def safetensors_field_cases(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """Structured mutations of a safetensors header: each field of its first tensor entry (dtype, shape,
    data_offsets) replaced by other dtypes, impossible shapes and offsets and every STRUCTURED value; the second
    entry's data moved onto the first's; __metadata__ and the entry itself replaced."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    first, second = [k for k in header if k != "__metadata__"][:2]
    special = {"dtype": ["I16", "I32", "BOOL", "F64", "U8", "F8_E4M3", "f32"],
               "shape": [[-1], [2**64], [], [0, 7], [1, 2**40], [2**32, 2**32]],
               "data_offsets": [[0, 2**64], [10, 5], [-4, 0], [0], [0, 4, 8]]}

    def encoded(h):
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    for path in [(first, f) for f in special] + [(first,), ("__metadata__",)]:
        extra = [(f"{v}", v) for v in special.get(path[-1], [])] if len(path) == 2 else []
        for label, value in extra + STRUCTURED:
            yield f"{name}:{'.'.join(path)}={label}", encoded(_replaced(header, path, value))
    (begin, _), (b2, e2) = header[first]["data_offsets"], header[second]["data_offsets"]
    yield f"{name}:overlap", encoded(_replaced(header, (second, "data_offsets"), [begin, begin + e2 - b2]))


# ---------------------------------------------------------------- the cases of each reader

# The keys the readers read (the fast suite mutates these; every_key=True mutates every key of each file)
HF_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
           "vocab_size", "rms_norm_eps", "rope_theta", "rope_parameters", "max_position_embeddings", "_name_or_path")
CONCAT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok")
GPTQ_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "format", "quant_method")
AUTOROUND = Path(__file__).parent / "fixtures" / "autoround" / "checkpoint"
LLMCOMPRESSOR = Path(__file__).parent / "fixtures" / "llmcompressor" / "w4a16-asym-g32" / "checkpoint"
BNB = Path(__file__).parent / "fixtures" / "bnb" / "nf4-double" / "checkpoint"
_GROUP = ("quantization_config", "config_groups", "group_0")
COMPRESSED_KEYS = (("quantization_config", "format"), ("quantization_config", "config_groups"),
                   (*_GROUP, "format")) + tuple((*_GROUP, "weights", k) for k in (
                       "num_bits", "strategy", "group_size", "symmetric"))
BNB_KEYS = tuple(("quantization_config", k) for k in ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                                      "quant_method"))
STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_offset")  # of bitsandbytes' quant_state JSON


def cases(sources: dict[str, Path], seed: int = SEED, scale: float = 1.0, every_key: bool = False
          ) -> Iterator[tuple[str, Path, Changes]]:
    """(label, source dir, changes) for every reader; `scale` multiplies the number of random mutations."""
    rng = random.Random(seed)

    def n(k):
        return max(1, round(k * scale))

    def read(src, f):
        return (src / f).read_bytes()

    def each(src, fname, gen):
        return ((f"{src.name}/{label}", src, {fname: data}) for label, data in gen)

    def keys(*names):
        return None if every_key else [(k,) for k in names]

    hf = sources["hf"]
    index = json.loads(read(hf, "model.safetensors.index.json"))
    shards = sorted(p.name for p in hf.glob("*.safetensors"))
    yield from each(hf, "config.json", structured_cases("config.json", json.loads(read(hf, "config.json")),
                                                        keys(*HF_KEYS)))
    yield from each(hf, "config.json", byte_cases("config.json", read(hf, "config.json"), rng, n(10)))
    yield from each(hf, "model.safetensors.index.json",
                    structured_cases("index", index, [("weight_map",), ("metadata",)]))
    first_key = next(iter(index["weight_map"]))
    yield from each(hf, "model.safetensors.index.json", (
        (f"index:weight_map[{first_key}]={label}",
         json.dumps(_replaced(index, ("weight_map", first_key), value)).encode())
        for label, value in STRUCTURED + [("../escape", "../x.safetensors"), ("/abs", "/etc/hostname"),
                                          ("missing", "nowhere.safetensors")]))
    yield from each(hf, "model.safetensors.index.json",
                    byte_cases("index", read(hf, "model.safetensors.index.json"), rng, n(10)))
    yield from each(hf, shards[0], safetensors_field_cases(shards[0], read(hf, shards[0])))
    for shard in shards:
        data = read(hf, shard)
        yield from each(hf, shard, byte_cases(shard, data, rng, n(12), [(0, safetensors_header_end(data))]))
        yield from each(hf, shard, truncation_cases(shard, data, rng, n(2)))
    yield f"hf/{shards[-1]}:removed", hf, {shards[-1]: None}
    yield from each(hf, "tokenizer_config.json", structured_cases(
        "tokenizer_config.json", json.loads(read(hf, "tokenizer_config.json")),
        [("add_bos_token",), ("add_eos_token",), ("chat_template",)]))

    mis = sources["mistral"]
    yield from each(mis, "params.json", structured_cases("params.json", json.loads(read(mis, "params.json"))))
    yield from each(mis, "params.json", byte_cases("params.json", read(mis, "params.json"), rng, n(10)))
    data = read(mis, "consolidated.safetensors")
    yield from each(mis, "consolidated.safetensors", byte_cases(
        "consolidated.safetensors", data, rng, n(25), [(0, safetensors_header_end(data))]))
    yield from each(mis, "consolidated.safetensors", truncation_cases("consolidated.safetensors", data, rng, n(5)))

    pth = sources["mistral-pth"]
    data = read(pth, "consolidated.00.pth")
    yield from each(pth, "consolidated.00.pth", byte_cases("consolidated.00.pth", data, rng, n(60),
                                                           zip_metadata_spans(data)))
    yield from each(pth, "consolidated.00.pth", truncation_cases("consolidated.00.pth", data, rng, n(8)))

    cat = sources["concat"]
    yield from each(cat, "params.json", structured_cases("params.json", json.loads(read(cat, "params.json")),
                                                         keys(*CONCAT_KEYS)))
    data = read(cat, "consolidated.00.pt")
    yield from each(cat, "consolidated.00.pt", byte_cases("consolidated.00.pt", data, rng, n(25),
                                                          zip_metadata_spans(data)))

    pad = sources["paddle"]
    data = read(pad, "model_state.safetensors")
    yield from each(pad, "model_state.safetensors", byte_cases(
        "model_state.safetensors", data, rng, n(25), [(0, safetensors_header_end(data))]))
    yield from each(pad, "model_state.safetensors", truncation_cases("model_state.safetensors", data, rng, n(5)))
    yield from each(pad, "config.json", byte_cases("config.json", read(pad, "config.json"), rng, n(8)))

    yield from pdparams_cases(sources["paddle-pdparams"], rng, n, each)

    gq = sources["gptq"]
    gconfig = json.loads(read(gq, "config.json"))
    qkeys = None if every_key else [("quantization_config",)] + [("quantization_config", k) for k in GPTQ_KEYS]
    yield from each(gq, "config.json", structured_cases("config.json", gconfig, qkeys))
    if every_key:  # read only where config.json has no quantization_config
        del gconfig["quantization_config"]
        plain = json.dumps(gconfig).encode()
        for label, data in structured_cases("quantize_config.json", json.loads(read(gq, "quantize_config.json"))):
            yield f"gptq/{label}", gq, {"config.json": plain, "quantize_config.json": data}
    for shard in sorted(p.name for p in gq.glob("*.safetensors")):
        data = read(gq, shard)
        yield from each(gq, shard, byte_cases(shard, data, rng, n(25), [(0, safetensors_header_end(data))]))
        yield from each(gq, shard, truncation_cases(shard, data, rng, n(5)))

    ar = sources["gptq-autoround"]
    ar_keys = None if every_key else [("quantization_config", k) for k in (*GPTQ_KEYS, "dynamic")]
    yield from each(ar, "config.json", structured_cases("config.json", json.loads(read(ar, "config.json")), ar_keys))
    data = read(ar, "model.safetensors")
    yield from each(ar, "model.safetensors", byte_cases("model.safetensors", data, rng, n(25),
                                                        [(0, safetensors_header_end(data))]))
    yield from each(ar, "model.safetensors", truncation_cases("model.safetensors", data, rng, n(5)))

    for name, qkeys in (("compressed", COMPRESSED_KEYS), ("bnb", BNB_KEYS)):
        src = sources[name]
        config = json.loads(read(src, "config.json"))
        yield from each(src, "config.json", structured_cases("config.json", config, None if every_key else qkeys))
        data = read(src, "model.safetensors")
        yield from each(src, "model.safetensors", byte_cases("model.safetensors", data, rng, n(25),
                                                             [(0, safetensors_header_end(data))]))
        yield from each(src, "model.safetensors", truncation_cases("model.safetensors", data, rng, n(5)))
    yield from each(sources["bnb"], "model.safetensors", quant_state_cases(sources["bnb"] / "model.safetensors"))


def quant_state_cases(shard: Path) -> Iterator[tuple[str, bytes]]:
    """bitsandbytes' quant_state JSON (stored as uint8 bytes) of one module: each field of STATE_KEYS replaced by
    every STRUCTURED value, and the bytes replaced by other JSON than an object and by text that is no JSON."""
    from safetensors.torch import save
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if ".quant_state.bitsandbytes__" in k)
    state = json.loads(bytes(tensors[key].tolist()))

    def with_bytes(raw: bytes) -> bytes:
        return save({**tensors, key: torch.tensor(list(raw) or [0], dtype=torch.uint8)}, metadata={"format": "pt"})
    for field in STATE_KEYS:
        for label, value in STRUCTURED:
            yield f"quant_state:{field}={label}", with_bytes(json.dumps(_replaced(state, (field,), value)).encode())
    for label, raw in (("array", b"[1]"), ("null", b"null"), ("text", b"nf4"), ("latin1", b"{\"q\xe9\": 1}")):
        yield f"quant_state:<{label}>", with_bytes(raw)


def pdparams_cases(pdp: Path, rng: random.Random, n: Callable, each: Callable) -> Iterator[tuple[str, Path, Changes]]:
    """PaddleNLP's sharded .pdparams: opcode operands of the first shard set to extremes and neighbours,
    byte mutations of the pickles' opcodes (not the tensor data), truncations, and the index's entries."""
    index_name = "model_state.pdparams.index.json"
    shards = sorted(p.name for p in pdp.glob("*.pdparams"))
    data = (pdp / shards[0]).read_bytes()
    fields = pickle_fields(data)
    yield from each(pdp, shards[0], ((f"{shards[0]}:{label}", new) for label, new in (
        mutate_field(data, field, rng) for field in rng.sample(fields, min(len(fields), n(40))))))
    for shard in (shards[0], shards[-1]):
        data = (pdp / shard).read_bytes()
        yield from each(pdp, shard, byte_cases(shard, data, rng, n(25), pickle_spans(data)))
        yield from each(pdp, shard, truncation_cases(shard, data, rng, n(5)))
    index = json.loads((pdp / index_name).read_bytes())
    first_key = next(iter(index["weight_map"]))
    yield from each(pdp, index_name, (
        (f"index:weight_map[{first_key}]={label}",
         json.dumps(_replaced(index, ("weight_map", first_key), value)).encode())
        for label, value in STRUCTURED + [("../escape", "../x.pdparams"), ("safetensors", "model.safetensors"),
                                          ("missing", "nowhere.pdparams")]))
    yield from each(pdp, index_name, byte_cases("index", (pdp / index_name).read_bytes(), rng, n(8)))
    yield f"paddle-pdparams/{shards[-1]}:removed", pdp, {shards[-1]: None}


def materialize(src: Path, dst: Path, changes: Changes) -> Path:
    """dst: src with every unchanged file hard-linked (inputs are never modified) and `changes` applied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in changes:
            os.link(f, dst / f.name)
    for fname, data in changes.items():
        if data is not None:
            (dst / fname).write_bytes(data)
    return dst


# a calibration / evaluation text whose token ids all fit the sources' 512-piece vocabulary
SHORT_TEXT = " ".join(["in the of to and a on at by is"] * 8)


def verb_argv(verb: str, case: Path, work: Path) -> list:
    """The command line of `verb` on a case directory (outputs under work; short runs on SHORT_TEXT)."""
    text = work / "short.txt"
    if not text.exists():
        text.write_text(SHORT_TEXT)
    short = ["--text", text, "--ctx", "32", "--chunks", "1", "--device", "cpu"]
    return {"inspect": ["inspect", case],
            "convert": ["convert", case, "--to", "gguf", "--outtype", "q8_0", "-o", work / "out.gguf"],
            "imatrix": ["imatrix", case, "--calib", *short[1:], "-o", work / "out.imatrix.gguf"],
            "verify": ["verify", case, "--reference", case, *short],
            "quantize": ["quantize", case, "--calib", text, "--nsamples", "2", "--seqlen", "32", "--group-size",
                         "32", "--device", "cpu", "-o", work / "out-gptq"]}[verb]


OUTPUTS = ("out.gguf", "out.imatrix.gguf", "out-gptq")


def run_case(label: str, src: Path, changes: Changes, work: Path, verbs=("inspect",),
             check: Callable | None = None) -> list[str]:
    """Run each of `verbs` on one case; the contract's breaches, labelled. A failed writer must leave nothing."""
    case = materialize(src, work / "case", changes)
    failures, worst = [], 0.0
    try:
        for verb in verbs:
            res = run_isolated(verb_argv(verb, case, work))
            worst = max(worst, res.peak_rss_mb)
            why = res.problem()
            if why is None and res.code == 2 and str(case) not in res.stderr:
                why = f"the error line names no file of the case: {res.stderr.strip()}"
            if why is None and res.code == 2 and any(p.name.startswith(OUTPUTS) or p.name.startswith(
                    tuple("." + o for o in OUTPUTS)) for p in work.iterdir()):
                why = f"a failed {verb} left output behind"
            if why is not None:
                failures.append(f"{label} [{verb}]: {why}")
            if check:
                check(label, verb, res)
            for o in OUTPUTS:
                shutil.rmtree(work / o, ignore_errors=True) if (work / o).is_dir() else (work / o).unlink(
                    missing_ok=True)
    finally:
        shutil.rmtree(case, ignore_errors=True)
    run_case.worst_rss_mb = max(getattr(run_case, "worst_rss_mb", 0.0), worst)
    return failures


# ---------------------------------------------------------------- the fast suite (make test)

def verbs_for(k: int) -> tuple[str, ...]:
    """inspect for every case; convert (q8_0: the block-quantized path) for every 25th, imatrix and verify for
    every 25th (another subset), a short GPTQ quantize for every 80th."""
    return ("inspect",) + (("convert",) if k % 25 == 0 else ()) + (("imatrix", "verify") if k % 25 == 12 else ()) \
        + (("quantize",) if k % 80 == 40 else ())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_sources(tmp_path_factory.mktemp("fuzz-src"))


def test_unmutated_sources_read_cleanly(sources, tmp_path):
    """The baseline the mutations start from: every verb succeeds on every source."""
    for name, src in sources.items():
        (tmp_path / name).mkdir()
        for verb in ("inspect", "convert", "imatrix", "verify", "quantize"):
            res = run_isolated(verb_argv(verb, src, tmp_path / name))
            assert res.code == 0, (name, verb, res.stderr, res.traceback)


def test_every_directory_reader_survives_mutated_inputs(sources, tmp_path):
    failures, counts, exits = [], {}, {0: 0, 2: 0}

    def tally(label, verb, res):
        exits[res.code] = exits.get(res.code, 0) + 1

    for k, (label, src, changes) in enumerate(cases(sources)):
        counts[src.name] = counts.get(src.name, 0) + 1
        failures += run_case(label, src, changes, tmp_path, verbs_for(k), check=tally)
    print(f"cases per reader: {counts}; exits: {exits}; worst peak RSS {run_case.worst_rss_mb:.0f} MB")
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:40])
    assert exits[2] > exits[0], exits  # the mutations do reach the checks (most inputs are refused)
    assert min(counts.values()) >= 35, counts


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("what", ["last shard", "tokenizer_config"])
def test_a_failed_open_leaves_no_file_open(sources, tmp_path, what):
    """A corrupt later shard (or tokenizer config) closes every shard opened before it, and itself."""
    from mxtools.core.errors import FormatError
    from mxtools.layouts import open_checkpoint
    shards = sorted(p.name for p in sources["hf"].glob("*.safetensors"))
    change = {shards[-1]: b"\x02" + b"\x00" * 7 + b"{]"} if what == "last shard" else \
        {"tokenizer_config.json": b'{"chat_template": 1}'}
    case = materialize(sources["hf"], tmp_path / "case", change)
    before = _open_fds()
    with pytest.raises(FormatError, match="corrupt safetensors header|chat_template must be a string"):
        open_checkpoint(case)
    assert _open_fds() == before
