"""GPTQ tensor names (`--names vllm|transformers`): both read back as the same weights, a GPTQ checkpoint is
re-exported under the other names byte for byte, and our default output passes the checks vLLM's GPTQ Marlin
loader makes (written here from vLLM's source; GPTQModel loading the transformers names is in
test_gptq_checkpoint.py)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import small_spec, write_synth
from safetensors import safe_open

from mxtools.cli import main
from mxtools.commands.quantize import QuantizeSettings, run_quantize
from mxtools.core.bundled import EVAL
from mxtools.layouts import open_checkpoint

# hidden and intermediate multiples of 128 and attention outputs multiples of 64: what Marlin needs
SPEC = small_spec(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("src") / "hf", "hf", "f16", spec=SPEC)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    """RTN int4 g128 (the names do not depend on the method) under each naming."""
    root = tmp_path_factory.mktemp("q")
    run_quantize(src, root / "vllm", QuantizeSettings(method="rtn"))  # the default naming
    r = CliRunner().invoke(main, ["quantize", str(src), "--method", "rtn", "--names", "transformers",
                                  "-o", str(root / "transformers")])
    assert r.exit_code == 0, r.output
    return root


def stored(path) -> dict:
    """key -> tensor of every shard of a directory."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


TRANSFORMERS_KEY = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def transformers_key(key: str) -> str:
    """What each vLLM-named key is called in transformers 5 (written out here, independently of NAMINGS)."""
    key = re.sub(r"\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.",
                 lambda m: f".mlp.experts.{m[1]}.{TRANSFORMERS_KEY[m[2]]}.", key)
    return key.replace(".block_sparse_moe.gate.", ".mlp.gate.")


def test_each_naming_stores_its_names_and_reads_back_the_same_weights(quantized):
    vllm, hf5 = stored(quantized / "vllm"), stored(quantized / "transformers")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in vllm
    assert "model.layers.1.mlp.experts.3.down_proj.qweight" in hf5 and "model.layers.0.mlp.gate.weight" in hf5
    assert not [k for k in hf5 if "block_sparse_moe" in k or re.search(r"\.w[123]\.", k)]
    assert sorted(hf5) == sorted(transformers_key(k) for k in vllm)
    for d, names in ((quantized / "vllm", "vllm"), (quantized / "transformers", "transformers")):
        qc = json.loads((d / "quantize_config.json").read_text())
        assert qc["meta"]["tensor_names"] == names
        assert json.loads((d / "config.json").read_text())["quantization_config"] == qc
    with open_checkpoint(quantized / "vllm") as a, open_checkpoint(quantized / "transformers") as b:
        assert (a.info["tensor_names"], b.info["tensor_names"]) == ("vllm", "transformers")
        assert sorted(a.tensors) == sorted(b.tensors)
        for name, t in a.tensors.items():
            assert torch.equal(t.load(), b.tensors[name].load()), name


def test_inspect_and_verify_read_the_transformers_names(quantized):
    runner = CliRunner()
    r = runner.invoke(main, ["inspect", str(quantized / "transformers"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["layout"] == "gptq" and report["info"]["tensor_names"] == "transformers" and not report["problems"]
    # verify reads them too: against the same weights under vLLM's names, every statistic is exact
    r = runner.invoke(main, ["verify", str(quantized / "transformers"), "--reference", str(quantized / "vllm"),
                             "--ctx", "64", "--chunks", "2", "--device", "cpu", "--text", str(EVAL), "--json",
                             str(quantized.parent / "verify.json")])
    assert r.exit_code == 0, r.output
    verdict = json.loads((quantized.parent / "verify.json").read_text())
    assert verdict["kld_mean"] == 0 and verdict["same_top_p"] == 1 and verdict["ppl_ratio"] == 1


@pytest.mark.parametrize("names,other", [("transformers", "vllm"), ("vllm", "transformers")])
def test_convert_reexports_byte_for_byte_under_the_other_names(quantized, tmp_path, names, other):
    out = tmp_path / names
    r = CliRunner().invoke(main, ["convert", str(quantized / other), "--to", "gptq", "--names", names,
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    ours, reference = stored(out), stored(quantized / names)  # the same model quantized under `names` directly
    assert sorted(ours) == sorted(reference)
    source = stored(quantized / other)
    for key, t in source.items():
        new_key = transformers_key(key) if names == "transformers" else key
        if names == "vllm":
            new_key = next(k for k in reference if transformers_key(k) == key)
        assert ours[new_key].dtype == t.dtype and raw_bytes(ours[new_key]) == raw_bytes(t), key
    qc_in = json.loads((quantized / other / "quantize_config.json").read_text())
    qc_out = json.loads((out / "quantize_config.json").read_text())
    assert qc_out == {**qc_in, "meta": {**qc_in["meta"], "tensor_names": names}}
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (quantized / other, out))
    assert cfg_out == {**cfg_in, "quantization_config": qc_out}
    for f in ("tokenizer.model", "tokenizer.json", "generation_config.json", "quantize_report.json"):
        assert (out / f).read_bytes() == (quantized / other / f).read_bytes(), f


def test_convert_names_misuse_is_one_line_and_exit_2(quantized, src, tmp_path):
    runner = CliRunner()
    cases = [(["convert", str(quantized / "vllm"), "--to", "gptq", "--outtype", "f32", "-o", str(tmp_path / "a")],
              "re-exported with every tensor as stored"),
             (["convert", str(src), "--to", "hf", "--names", "transformers", "-o", str(tmp_path / "b")],
              "--names applies to --to gptq only")]
    for args, message in cases:
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not list(tmp_path.iterdir())


def test_rtn_from_a_float_source_takes_names(src, tmp_path):
    out = tmp_path / "t"
    r = CliRunner().invoke(main, ["convert", str(src), "--to", "gptq", "--names", "transformers", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "model.layers.0.mlp.experts.0.gate_proj.qweight" in stored(out)


# ---------------------------------------------------------------- vLLM's GPTQ Marlin checks

# vllm/model_executor/layers/quantization/gptq_marlin.py (GPTQMarlinConfig.TYPE_MAP, is_gptq_marlin_compatible)
# and utils/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES, GPTQ_MARLIN_MIN_THREAD_N/K, verify_marlin_supports_shape,
# check_moe_marlin_supports_layer); names from vllm/model_executor/models/mixtral.py (qkv/o_proj, the router a
# ReplicatedLinear with quant_config=None, experts mapped from `experts.{e}.w1|w2|w3.`).
MARLIN_TYPES = {(4, True), (8, True)}
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MIN_THREAD_N, MIN_THREAD_K = 64, 128
PARTS = ("qweight", "qzeros", "scales", "g_idx")
VLLM_QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])$")
VLLM_FLOAT = re.compile(r"(model\.embed_tokens|model\.norm|lm_head|model\.layers\.\d+\.(input_layernorm|"
                        r"post_attention_layernorm|block_sparse_moe\.gate))\.weight$")


def marlin_problems(path) -> list[str]:
    """Why vLLM would not load this directory with its GPTQ Marlin kernels (dense and MoE), or []."""
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    cfg = json.loads((path / "config.json").read_text())
    bits, group, sym, desc_act = (qc.get(k) for k in ("bits", "group_size", "sym", "desc_act"))
    problems = []
    if qc.get("quant_method") != "gptq" or None in (bits, group, sym, desc_act):
        problems.append("config lacks quant_method gptq, bits, group_size, sym or desc_act")
    if (bits, sym) not in MARLIN_TYPES or group not in MARLIN_GROUP_SIZES:
        problems.append(f"bits {bits} sym {sym} group_size {group}: no Marlin kernel")
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    if hidden % 128 or inter % max(64, group or 0):
        problems.append(f"MoE Marlin needs hidden % 128 == 0 and intermediate % max(64, g) == 0 ({hidden}, {inter})")
    tensors = stored(path)
    bases = {k.rpartition(".")[0] for k in tensors if k.rpartition(".")[2] in PARTS}
    for key in tensors:
        base, _, part = key.rpartition(".")
        if not (VLLM_FLOAT.match(key) or (part in PARTS and VLLM_QUANTIZED.match(base))):
            problems.append(f"{key}: no such parameter in vLLM's Mixtral")
    for base in sorted(bases):
        problems += _linear_problems(base, {p: tensors.get(f"{base}.{p}") for p in PARTS}, bits, group, desc_act)
    return problems


def _linear_problems(base, t, bits, group, desc_act) -> list[str]:
    if any(v is None for v in t.values()):
        return [f"{base}: lacks one of {PARTS}"]
    pack = 32 // bits
    in_f, out_f = t["g_idx"].shape[0], t["qweight"].shape[1]
    groups = 1 if group == -1 else in_f // group
    want = {"qweight": (torch.int32, (in_f // pack, out_f)), "qzeros": (torch.int32, (groups, out_f // pack)),
            "scales": ((torch.float16, torch.bfloat16), (groups, out_f)), "g_idx": (torch.int32, (in_f,))}
    out = [f"{base}.{p}: {t[p].dtype} {list(t[p].shape)}" for p, (dt, shape) in want.items()
           if t[p].dtype not in (dt if isinstance(dt, tuple) else (dt,)) or tuple(t[p].shape) != shape]
    if out_f % MIN_THREAD_N or in_f % MIN_THREAD_K or (group != -1 and in_f % group):
        out.append(f"{base}: [{out_f}, {in_f}] does not tile for Marlin")
    g = t["g_idx"]
    if not desc_act and not torch.equal(g, torch.arange(in_f, dtype=torch.int32) // (group if group > 0 else in_f)):
        out.append(f"{base}: g_idx is not i // group_size without desc_act")
    return out


def test_our_default_output_passes_vllms_marlin_checks(quantized, src, tmp_path):
    assert marlin_problems(quantized / "vllm") == []
    act = tmp_path / "act"
    run_quantize(src, act, QuantizeSettings(group_size=64, act_order=True, nsamples=2, seqlen=64))
    assert marlin_problems(act) == []
    int8 = tmp_path / "int8"
    run_quantize(src, int8, QuantizeSettings(method="rtn", bits=8, group_size=-1))
    assert marlin_problems(int8) == []


def test_the_marlin_checks_can_fail(quantized, src, tmp_path):
    assert any("no such parameter" in p for p in marlin_problems(quantized / "transformers"))
    asym = tmp_path / "asym"
    run_quantize(src, asym, QuantizeSettings(method="rtn", sym=False))
    assert [p for p in marlin_problems(asym) if "no Marlin kernel" in p] == \
        ["bits 4 sym False group_size 128: no Marlin kernel"]
