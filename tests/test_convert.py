"""Every ordered pair of writable layouts round-trips bit-exactly (tensors, configs, tokenizer)."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_spec

from mxtools.commands.convert import convert
from mxtools.commands.synth import synth_checkpoint
from mxtools.core import names
from mxtools.core.tensors import FLOAT_DTYPES
from mxtools.layouts import open_checkpoint, writable

LAYOUTS = ["hf", "mistral", "gguf"]
WEIGHT_FILE = {"hf": "model.safetensors", "mistral": "consolidated.safetensors", "gguf": None}


def _out(tmp, name, layout):
    return tmp / (name + (".gguf" if layout == "gguf" else ""))


def assert_same_tensors(a_path, b_path):
    with open_checkpoint(a_path) as a, open_checkpoint(b_path) as b:
        assert a.spec.replace(name="") == b.spec.replace(name="")
        assert sorted(a.tensors) == sorted(b.tensors)
        for n in names.canonical_names(a.spec):
            ta, tb = a.tensors[n].load(), b.tensors[n].load()
            assert ta.dtype == tb.dtype or ta.ndim == 1 or "gate.weight" in n, n
            assert torch.equal(ta.to(torch.float32), tb.to(torch.float32)), n
        assert a.tokenizer.sp_model == b.tokenizer.sp_model


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("src,dst", list(itertools.permutations(LAYOUTS, 2)))
def test_round_trip_bit_exact(tmp_path, synth_dir, src, dst, dtype):
    a = synth_dir(src, dtype)
    b = convert(a, dst, _out(tmp_path, "b", dst), dtype)
    c = convert(b, src, _out(tmp_path, "c", src), dtype)
    assert_same_tensors(a, b)
    assert_same_tensors(a, c)
    if WEIGHT_FILE[src]:  # the same bytes on disk, not just equal values
        assert (a / WEIGHT_FILE[src]).read_bytes() == (c / WEIGHT_FILE[src]).read_bytes()
        assert (a / "tokenizer.model").read_bytes() == (c / "tokenizer.model").read_bytes()


def test_source_values_survive(tmp_path, synth_dir):
    """What the readers return equals what synth generated, so round trips are not merely self-consistent."""
    spec = small_spec()
    ref = synth_checkpoint(spec, 0, torch.float32)
    for layout in LAYOUTS:
        with open_checkpoint(synth_dir(layout, "f32")) as ck:
            for n in names.canonical_names(spec):
                assert torch.equal(ck.tensors[n].load(), ref.tensors[n].load()), (layout, n)


def test_writable_layouts_are_registered():
    assert set(writable()) == set(LAYOUTS) | {"gptq"}


def test_hf_sharding_and_index(tmp_path, synth_dir):
    out = convert(synth_dir("hf", "f32"), "hf", tmp_path / "sharded", "f32", shard_bytes=2_000_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    assert_same_tensors(synth_dir("hf", "f32"), out)


def test_auto_outtype_keeps_source_dtype(tmp_path, synth_dir):
    out = convert(synth_dir("hf", "bf16"), "mistral", tmp_path / "m")
    with open_checkpoint(out) as ck:
        assert {t.dtype for t in ck.tensors.values()} == {FLOAT_DTYPES["bf16"]}


def test_chat_template_and_special_ids_survive(tmp_path, synth_dir):
    import json
    import shutil
    src = tmp_path / "instruct"
    shutil.copytree(synth_dir("hf", "f32"), src)
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    g = convert(src, "gguf", tmp_path / "i.gguf", "f32")
    back = convert(g, "hf", tmp_path / "back", "f32")
    with open_checkpoint(g) as ck:
        tok = ck.tokenizer
        assert tok.chat_template == template and (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
        assert tok.add_bos and not tok.add_eos
    assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"] == template


def test_inspect_reports_layout_and_problems(tmp_path, synth_dir):
    import json

    from click.testing import CliRunner

    from mxtools.cli import main
    r = CliRunner().invoke(main, ["inspect", str(synth_dir("gguf", "bf16")), "--json"])
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["layout"] == "gguf" and info["tensors"] == 2 + 1 + 2 * (7 + 3 * 4)
    # counted per canonical tensor: the merged GGUF expert tensors count once per expert
    assert info["types"] == {"bfloat16": 2 + 2 * (4 + 3 * 4), "float32": 1 + 2 * 3} and info["problems"] == []
    assert info["config"]["n_experts"] == 4
