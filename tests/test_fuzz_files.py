"""Deterministic fuzz suite of the single-file readers: GGUF models (merged and legacy
per-expert), tokenizer.model, importance matrices (GGUF and legacy .dat), saved verify bases and recipes.

Each mutated file (seeded: random byte changes in the header, truncation, structured changes of every header
field) goes through the CLI's error boundary in a forked child (tests/fuzzing.py): it must end with exit 0, or
exit 2 and exactly one `mxtools: error:` line naming the file, within the time and memory limits, and leave no
temporary output behind. The models are small-vocabulary synthetic Mixtrals, so a case costs milliseconds of
parsing and the verb's own work, not the 32000-piece vocabulary's."""
from __future__ import annotations

import json
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import small_spec
from fuzzing import gguf_fields, mutate, mutate_field, pickle_fields, pickle_spans, run_isolated, set_field

import mxtools.cli  # noqa: F401  (imported before forking: each case starts warm)
from mxtools.commands.convert import write_checkpoint
from mxtools.commands.synth import synth_checkpoint
from mxtools.core.bundled import EVAL
from mxtools.core.errors import MxError
from mxtools.core.tokenizer import Tokenizer
from mxtools.io.gguf_writer import GGUFStreamWriter
from mxtools.quant.imatrix import ImatrixStat, save_imatrix
from mxtools.quant.mixes import Mix, load_mix

SEED = 9
PADDLE_DIR = Path(__file__).parent / "fixtures" / "paddle" / "mixtral-pdparams"  # written by PaddleNLP itself
N_VOCAB = 512  # the first 512 pieces of the v1 vocabulary (control, 256 bytes, merges)


def small_vocab_tokenizer(n: int = N_VOCAB) -> Tokenizer:
    pieces, scores, types = Tokenizer.default().vocab()
    return Tokenizer.from_vocab(pieces[:n], scores[:n], types[:n])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_files(tmp_path_factory.mktemp("fuzz"))


def build_files(root: Path) -> dict[str, Path]:
    """The fuzz model (small vocabulary) as an F32 GGUF, a Q8_0 GGUF, a legacy per-expert GGUF and an HF
    directory; an evaluation text; its importance matrix (GGUF and .dat), saved base and an RTN recipe.
    (Also the seeds of bench/fuzz.py's long run.)"""
    ckpt = synth_checkpoint(small_spec(vocab_size=N_VOCAB), 0, torch.float32)
    ckpt.tokenizer = small_vocab_tokenizer()
    m = {"gguf": write_checkpoint(ckpt, "gguf", root / "f32.gguf", "f32"),
         "q8_0": write_checkpoint(ckpt, "gguf", root / "q8_0.gguf", "q8_0"),
         "hf": write_checkpoint(ckpt, "hf", root / "hf", "f32")}
    m["legacy"] = legacy_gguf(m["gguf"], root / "legacy.gguf")
    m["text"] = root / "eval.txt"
    m["text"].write_text(EVAL.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    stats = {n: ImatrixStat(torch.rand(t.shape[1], generator=torch.Generator().manual_seed(i)) * 4, 7 + i % 5)
             for i, (n, t) in enumerate(ckpt.tensors.items()) if len(t.shape) == 2 and "embed" not in n}
    m["imatrix"] = save_imatrix(root / "imatrix.gguf", stats, chunk_size=32, chunk_count=2, datasets=["fuzz"])
    m["dat"] = legacy_dat(stats, root / "imatrix.dat")
    m["base"] = root / "base.bin"
    out = run_isolated(["verify", m["hf"], "--save-base", m["base"], *base_args(m)])
    assert out.code == 0 and m["base"].is_file(), out.stderr + out.traceback
    m["pdparams"] = PADDLE_DIR / "model_state.pdparams"
    m["recipe"] = root / "rtn.yaml"
    m["recipe"].write_text(yaml.safe_dump({"name": "fuzz", "method": "rtn", "bits": 4, "group_size": 32,
                                           "sym": True, "damp": 0.01, "nsamples": 4, "seqlen": 64}))
    return m


def base_args(m: dict) -> list:
    """The verify options every base case shares (and the base was saved with)."""
    return ["--text", m["text"], "--ctx", 32, "--chunks", 2, "--device", "cpu"]


def legacy_gguf(src: Path, out: Path) -> Path:
    """`src` rewritten as llama.cpp wrote Mixtral GGUFs from Dec 2023 to Apr 2024: one 2-D tensor per expert."""
    from gguf import GGUFReader
    r = GGUFReader(src)
    w = GGUFStreamWriter(out)
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        value = f.contents()
        w.add(f.name, vtype, value, f.types[-1] if len(f.types) > 1 else None)
    parts = []
    for t in r.tensors:
        data = np.asarray(t.data)
        if "_exps." in t.name:
            for e in range(data.shape[0]):
                parts.append((t.name.replace("_exps.", f".{e}."), data[e], t.tensor_type))
        else:
            parts.append((t.name, data, t.tensor_type))
    for name, data, qtype in parts:
        w.plan(name, tuple(data.shape), qtype)
    w.write_header()
    for _, data, _ in parts:
        w.write(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    w.close()
    return out


def legacy_dat(stats: dict, out: Path) -> Path:
    """The legacy .dat imatrix of `stats` (per entry: name, ncall, nval, values = mean * ncall), one entry per
    GGUF tensor with the experts of a layer concatenated, as llama-imatrix wrote merged models."""
    from mxtools.layouts.gguf import TABLE
    merged: dict = {}
    for name, s in stats.items():
        gname, e = TABLE.to_layout(name)
        merged.setdefault(gname, []).append((e or 0, s))
    blob = struct.pack("<i", len(merged))
    for gname, parts in sorted(merged.items()):
        vals = torch.cat([s.sum_sq for _, s in sorted(parts, key=lambda p: p[0])]).numpy().astype("<f4")
        ncall = parts[0][1].count
        raw = gname.encode()
        blob += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size) + vals.tobytes()
    out.write_bytes(blob + struct.pack("<i", 2) + struct.pack("<i", 4) + b"fuzz")
    return out


# ---- cases ----

def gguf_mutations(src: Path, n: int, rng: random.Random, structured: float = 0.6):
    """n mutated copies of a GGUF: structured changes of header fields, or byte changes inside the header."""
    data = src.read_bytes()
    fields = gguf_fields(data)
    header_end = fields[-1][1] + 12
    for _ in range(n):
        if rng.random() < structured:
            yield mutate_field(data, rng.choice(fields), rng)
        else:
            yield mutate(data, rng, header_end)


def byte_mutations(src: Path, n: int, rng: random.Random, header_end: int | None = None):
    data = src.read_bytes()
    for _ in range(n):
        yield mutate(data, rng, header_end)


def pdparams_mutations(src: Path, n: int, rng: random.Random, structured: float = 0.5):
    """n mutated copies of a .pdparams pickle: an opcode's operand (a length, integer or memo index) set to an
    extreme or a neighbour, or byte changes among the opcodes (never inside a tensor's raw data)."""
    data = src.read_bytes()
    fields, spans = pickle_fields(data), pickle_spans(data)
    for _ in range(n):
        if rng.random() < structured:
            yield mutate_field(data, rng.choice(fields), rng)
        else:
            start, end = rng.choice(spans)
            kind, new = mutate(data[start:], rng, header_end=end - start)
            yield f"{kind}@{start}", data[:start] + new


def judge(out, target: Path, outputs: Path | None = None, also_named=()) -> str | None:
    """Why one CLI outcome breaks the contract, or None. An error must name `target` (or one of `also_named`:
    an input whose fit with the target's values failed); a failed run leaves no temporary output."""
    why = out.problem()
    if why is None and out.code == 2 and not any(f"{p}:" in out.stderr for p in (target, *also_named)):
        why = f"the error line does not name {target.name}: {out.stderr.strip()}"
    if why is None and outputs is not None and list(outputs.parent.glob(f".{outputs.name}.tmp*")):
        why = "a temporary output was left behind"
    return why


@dataclass
class Feed:
    """How one reader's mutated file reaches the CLI: where it is written, the call that reads it, the call's
    output (if any) and the other inputs an error may name instead of the file."""
    target: Path
    argv: list
    outputs: Path | None = None
    also_named: tuple = ()


def feeds(m: dict, work: Path) -> dict[str, Feed]:
    """Each reader's Feed, its files under `work`."""
    hf_copy = work / "hf"
    if not hf_copy.exists():  # tokenizer.model of an HF directory, the other files hard-linked, never changed
        hf_copy.mkdir(parents=True)
        for f in m["hf"].iterdir():
            if f.name != "tokenizer.model":
                (hf_copy / f.name).hardlink_to(f)
    pdp = work / "paddle"
    if not pdp.exists():  # PaddleNLP's config.json beside the mutated model_state.pdparams
        pdp.mkdir(parents=True)
        (pdp / "config.json").hardlink_to(PADDLE_DIR / "config.json")
    gguf, out, out_gguf = work / "m.gguf", work / "out", work / "out.gguf"
    imatrix = ["convert", m["hf"], "--to", "gguf", "--outtype", "q4_k_m", "-o", out_gguf, "--force", "--imatrix"]
    return {
        "inspect": Feed(target=gguf, argv=["inspect", gguf]),
        "inspect-header": Feed(target=gguf, argv=["inspect", "--no-weights", gguf]),
        "convert": Feed(target=gguf, argv=["convert", gguf, "--to", "hf", "-o", out, "--force"], outputs=out),
        "convert-gguf": Feed(target=gguf, outputs=out_gguf,
                             argv=["convert", gguf, "--to", "gguf", "--outtype", "f16", "-o", out_gguf, "--force"]),
        "imatrix-verb": Feed(target=gguf, outputs=work / "out.imatrix",
                             argv=["imatrix", gguf, "--calib", *base_args(m)[1:6], "-o", work / "out.imatrix",
                                   "--force"]),
        "verify-verb": Feed(target=gguf, argv=["verify", gguf, "--reference", m["hf"], *base_args(m),
                                               "--max-kld", 1e9, "--min-same-top", 0, "--max-ppl-ratio", 1e9]),
        "tokenizer": Feed(target=hf_copy / "tokenizer.model", argv=["inspect", "--no-weights", hf_copy]),
        "imatrix": Feed(target=work / "m.imatrix", argv=[*imatrix, work / "m.imatrix"], outputs=out_gguf),
        "dat": Feed(target=work / "m.dat", argv=[*imatrix, work / "m.dat"], outputs=out_gguf),
        "base": Feed(target=work / "m.bin", argv=["verify", m["hf"], "--base", work / "m.bin", *base_args(m),
                                                 "--max-kld", 1e9, "--min-same-top", 0, "--max-ppl-ratio", 1e9]),
        "pdparams": Feed(target=pdp / "model_state.pdparams", argv=["inspect", pdp], also_named=(pdp,)),
        "recipe": Feed(target=work / "r.yaml", outputs=out, also_named=(m["hf"],),
                       argv=["quantize", m["hf"], "--recipe", work / "r.yaml", "--device", "cpu", "-o", out,
                             "--force"]),
    }


def run_case(feed: Feed, data: bytes):
    """Write `data` to the feed's target and run its call: (outcome, why it breaks the contract or None).
    Temporary outputs a killed (timed-out) case left are removed first: they are not this case's."""
    if feed.outputs is not None:
        for stale in feed.outputs.parent.glob(f".{feed.outputs.name}.tmp*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    feed.target.write_bytes(data)
    out = run_isolated(feed.argv)
    return out, judge(out, feed.target, feed.outputs, feed.also_named)


def run_cases(feed: Feed, cases) -> list[str]:
    """Run each (label, bytes) case through the feed; the failures, one line each."""
    failures = []
    for label, data in cases:
        why = run_case(feed, data)[1]
        if why:
            failures.append(f"{label}: {why}")
    return failures


def assert_clean(failures: list[str], n: int):
    assert not failures, f"{len(failures)} of {n} cases broke the contract:\n" + "\n".join(failures[:10])


def test_unmutated_files_read_cleanly(models, tmp_path):
    """The baseline the mutations start from: every seed file goes through its call with exit 0."""
    f = feeds(models, tmp_path)
    seeds = [("inspect", models[k]) for k in ("gguf", "q8_0", "legacy")] + [
        ("convert", models["gguf"]), ("convert-gguf", models["q8_0"]), ("imatrix-verb", models["gguf"]),
        ("verify-verb", models["gguf"]), ("tokenizer", models["hf"] / "tokenizer.model"),
        ("imatrix", models["imatrix"]), ("dat", models["dat"]), ("base", models["base"]), ("recipe", models["recipe"]),
        ("pdparams", models["pdparams"])]
    for name, seed in seeds:
        out, why = run_case(f[name], seed.read_bytes())
        assert why is None and out.code == 0, (name, out.stderr, out.traceback[-2000:])


# ---- GGUF models ----

@pytest.mark.parametrize("kind, n", [("gguf", 160), ("q8_0", 40), ("legacy", 40)])
def test_inspect_survives_mutated_gguf(models, tmp_path, kind, n):
    rng = random.Random(f"{SEED}-inspect-{kind}")
    assert_clean(run_cases(feeds(models, tmp_path)["inspect"], gguf_mutations(models[kind], n, rng)), n)


@pytest.mark.parametrize("kind, feed, n", [("gguf", "convert", 30), ("q8_0", "convert-gguf", 15)])
def test_convert_survives_mutated_gguf(models, tmp_path, kind, feed, n):
    rng = random.Random(f"{SEED}-convert-{kind}")
    assert_clean(run_cases(feeds(models, tmp_path)[feed], gguf_mutations(models[kind], n, rng)), n)


@pytest.mark.parametrize("verb", ["imatrix-verb", "verify-verb"])
def test_model_verbs_survive_mutated_gguf(models, tmp_path, verb):
    """imatrix and verify run the model: a mutated GGUF that opens must run through, or fail in one line."""
    rng = random.Random(f"{SEED}-{verb}")
    assert_clean(run_cases(feeds(models, tmp_path)[verb], gguf_mutations(models["gguf"], 25, rng)), 25)


def test_full_vocabulary_gguf_header(models, synth_dir, tmp_path):
    """A few cases on the real 32000-piece vocabulary (the bulk of a real GGUF header)."""
    rng = random.Random(f"{SEED}-full")
    feed = feeds(models, tmp_path)["inspect-header"]
    assert_clean(run_cases(feed, gguf_mutations(synth_dir("gguf", "f32"), 10, rng)), 10)


def test_known_failures(models, tmp_path):
    """The failures found by hand when the fuzz suites were written, each once: a negative token type (it drove a
    protobuf varint encoder into an endless, growing loop), a vocabulary SentencePiece refuses (a piece defined twice;
    its error escaped as a traceback), a saved base with a valid magic and a broken JSON header (a JSONDecodeError); and
    what the long run (bench/fuzz.py) found."""
    feeds_ = feeds(models, tmp_path)
    data = models["gguf"].read_bytes()
    field = next(f for f in gguf_fields(data) if f[0] == "tokenizer.ggml.token_type[0]")
    negative = set_field(data, field[1], "<i", -1)
    twice = data.replace(b"<0x01>", b"<0x00>", 1)
    base = models["base"].read_bytes()
    broken = base[:12] + b"{" * 40 + base[52:]
    # found by bench/fuzz.py: F32 data read as Q4_0 has NaN/inf scales (gguf-py warned on stderr)
    field = next(f for f in gguf_fields(data) if f[0] == "blk.0.attn_output.weight.type")
    q4_0 = set_field(data, field[1], "<I", 2)
    for feed, case in (("inspect", negative), ("inspect", twice), ("base", broken), ("inspect", q4_0)):
        out, why = run_case(feeds_[feed], case)
        assert why is None and out.code == 2, (feed, why, out.stderr)


# ---- tokenizer.model ----

def test_tokenizer_model_survives_mutation(models, tmp_path):
    rng = random.Random(f"{SEED}-spm")
    mutations = byte_mutations(models["hf"] / "tokenizer.model", 80, rng)
    assert_clean(run_cases(feeds(models, tmp_path)["tokenizer"], mutations), 80)


# ---- importance matrices ----

@pytest.mark.parametrize("kind, n", [("imatrix", 60), ("dat", 40)])
def test_imatrix_files_survive_mutation(models, tmp_path, kind, n):
    rng = random.Random(f"{SEED}-{kind}")
    mutations = (gguf_mutations(models[kind], n, rng) if kind == "imatrix"
                 else byte_mutations(models[kind], n, rng))
    assert_clean(run_cases(feeds(models, tmp_path)[kind], mutations), n)


# ---- saved verify bases ----

def base_mutations(src: Path, n: int, rng: random.Random):
    """Byte changes in the header and tokens; and n // 2 headers whose JSON is valid but holds a value of
    another type or range."""
    base = src.read_bytes()
    length = int.from_bytes(base[8:12], "little")  # magic, u32 header length, JSON, then the tokens
    yield from byte_mutations(src, n - n // 2, rng, 12 + length + 256)
    header = json.loads(base[12:12 + length])
    for _ in range(n // 2):
        key = rng.choice(sorted(header))
        value = rng.choice(['"x"', "null", "[]", "{}", "-1", "0", "1e99", "true", "1.5", "99999999999", "[[[[1]]]]"])
        text = ", ".join(f'"{k}": {value if k == key else json.dumps(v)}' for k, v in header.items())
        yield f"{key}={value}", base[:12] + ("{" + text + "}").encode().ljust(length) + base[12 + length:]


def test_pdparams_survives_mutation(models, tmp_path):
    """PaddleNLP's model_state.pdparams (a pickle read by mxtools' own interpreter): operand and opcode-byte
    mutations and truncations, through `inspect` (which reads every tensor)."""
    rng = random.Random(f"{SEED}-pdparams")
    data = models["pdparams"].read_bytes()
    cases = list(pdparams_mutations(models["pdparams"], 80, rng))
    cases += [(f"truncate@{cut}", data[:cut]) for cut in sorted(rng.sample(range(len(data)), 10))]
    assert_clean(run_cases(feeds(models, tmp_path)["pdparams"], cases), len(cases))


def test_saved_base_survives_mutation(models, tmp_path):
    rng = random.Random(f"{SEED}-base")
    assert_clean(run_cases(feeds(models, tmp_path)["base"], base_mutations(models["base"], 40, rng)), 40)


# ---- recipes ----

HOSTILE = ["abc", None, [], {}, -1, 0, 2**70, 1.5, True, "1e9", [[[]]], {"a": {"b": None}}]


def recipe_mutations(src: Path, n: int, rng: random.Random):
    text = src.read_text()
    data = yaml.safe_load(text)
    for i in range(n):
        if i % 3 == 0:
            yield mutate(text.encode(), rng)
            continue
        d = dict(data)
        choice = rng.random()
        if choice < 0.7:
            key = rng.choice(sorted(d))
            d[key] = rng.choice(HOSTILE)
            label = f"{key}={d[key]!r}"
        elif choice < 0.85:
            d[rng.choice(["extra", 7, "bits "])] = 1
            label = "unknown key"
        else:
            d = rng.choice([[d], "text", 42, None])
            label = f"top-level {type(d).__name__}"
        yield label, yaml.safe_dump(d).encode()
    yield "alias bomb", _alias_bomb().encode()
    yield "deep nesting", ("bits: " + "[" * 5000 + "]" * 5000).encode()


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


def test_gptq_recipe_survives_mutation(models, tmp_path):
    rng = random.Random(f"{SEED}-recipe")
    cases = list(recipe_mutations(models["recipe"], 45, rng))
    assert_clean(run_cases(feeds(models, tmp_path)["recipe"], cases), len(cases))


def test_mix_recipe_survives_mutation(tmp_path):
    """GGUF mixes are read by load_mix (a file path is accepted as a mix name): a Mix whose policy picks a
    type for every tensor, or an MxError naming the file; never another exception."""
    from mxtools import recipes
    rng = random.Random(f"{SEED}-mix")
    src = Path(recipes.find("q4_k_m", "gguf"))
    spec, failures, n = small_spec(), [], 0
    for label, data in recipe_mutations(src, 150, rng):
        target = tmp_path / "mix.yaml"
        target.write_bytes(data)
        n += 1
        try:
            mix = load_mix(str(target))
            assert isinstance(mix, Mix)
            pick = mix.policy(spec, imatrix=bool(n % 2))
            for key in ("token_embd", "attn_q", "attn_v", "ffn_down", "ffn_gate", "output"):
                pick(key, None if key in ("token_embd", "output") else 1, (64, 64))
        except MxError as exc:
            if str(target) not in exc.line():
                failures.append(f"{label}: error does not name the file: {exc.line()}")
        except Exception as exc:  # noqa: BLE001 - the failure this test looks for
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
    assert_clean(failures, n)
