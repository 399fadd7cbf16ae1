"""`mxtools compare`: one row per format, smallest first, the scratch directory gone afterwards (or kept with
--keep), the bitsandbytes rows' weights equal to an independent NF4 / LLM.int8 computation, and a missing
bitsandbytes or an unknown format refused in one line before any work."""
from __future__ import annotations

import json
import sys
import tempfile

import pytest
import torch
from click.testing import CliRunner
from conftest import small_spec, text_head, write_synth

from mxtools.cli import main
from mxtools.commands.compare import BNB_KINDS, DEFAULT_FORMATS, render, run_compare
from mxtools.core import names
from mxtools.core.bundled import EVAL
from mxtools.layouts import open_checkpoint

SPEC = small_spec(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=32)
FORMATS = "bnb-int8,rtn-int4,q8_0,bnb-nf4"
# NF4's 16 levels as the QLoRA paper defines them (normal quantiles, scaled to [-1, 1], with an exact zero)
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("src") / "hf", "hf", "bf16", spec=SPEC)


@pytest.fixture(scope="module")
def kept(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    text = text_head(tmp_path_factory, EVAL, 8000)
    r = CliRunner().invoke(main, ["compare", str(src), "--formats", FORMATS, "--text", str(text), "--chunks", "1",
                                  "--device", "cpu", "--keep", str(root / "keep"), "--json", str(root / "rows.json"),
                                  "--plot", str(root / "plot.png")])
    assert r.exit_code == 0, r.output
    (root / "stdout.txt").write_text(r.stdout)
    return json.loads((root / "rows.json").read_text()), root  # the JSON report is the result


def test_rows_are_sorted_by_size_and_saved(kept):
    result, root = kept
    rows = result["rows"]
    assert [r["format"] for r in rows] == ["q8_0", "rtn-int4", "bnb-nf4", "bnb-int8"]
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows)
    by = {r["format"]: r for r in rows}
    assert 8.5 <= by["q8_0"]["bpw_layers"] < 8.6  # Q8_0: 34 bytes per 32 weights
    assert 4.0 < by["rtn-int4"]["bpw_layers"] < by["bnb-nf4"]["bpw_layers"] < 4.6 < by["bnb-int8"]["bpw_layers"]
    for r in rows:
        assert r["kld_mean"] > 0 and 0.9 < r["ppl_ratio"] < 1.1 and 0 < r["same_top_p"] <= 1
    assert by["q8_0"]["kld_mean"] < by["rtn-int4"]["kld_mean"]
    assert by["bnb-int8"]["kld_mean"] < by["bnb-nf4"]["kld_mean"]
    table = render(result).splitlines()
    assert [line.split()[0] for line in table[2:]] == [r["format"] for r in rows]
    assert render(result) in (root / "stdout.txt").read_text()  # the table printed is the report's
    assert (root / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept_files = sorted(p.name for p in (root / "keep").iterdir())
    assert kept_files == ["base.logprobs", "bnb-int8", "bnb-nf4", "q8_0.gguf", "rtn-int4"]


def test_the_nf4_bytes_are_what_bitsandbytes_stores(kept, src):
    by = {r["format"]: r for r in kept[0]["rows"]}
    with open_checkpoint(src) as ckpt:
        want = 0
        for name, t in ckpt.tensors.items():
            n = torch.Size(t.shape).numel()
            want += n // 2 + (n // 64) * 4 if names.parse(name)[0].key in BNB_KINDS else 2 * n
    assert by["bnb-nf4"]["bytes"] == want


def independent_nf4(w: torch.Tensor) -> torch.Tensor:
    """NF4 of w in blocks of 64: each value scaled by its block's absmax, the nearest level, scaled back."""
    blocks = w.float().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - NF4_LEVELS).abs().argmin(dim=-1)
    return (NF4_LEVELS[idx] * absmax).to(w.dtype).float().reshape(w.shape)


def independent_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8's weight: w as float16, one absmax per row mapped to 127, rounded. (codes, scale per row)."""
    w = w.to(torch.float16).float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale), scale


def test_bnb_rows_hold_the_weights_an_independent_computation_gives(kept, src):
    root = kept[1] / "keep"
    with open_checkpoint(src) as source, open_checkpoint(root / "bnb-nf4") as nf4, \
            open_checkpoint(root / "bnb-int8") as int8:
        checked = 0
        for name, t in source.tensors.items():
            w = t.load()
            got4, got8 = nf4.tensors[name].load(), int8.tensors[name].load()
            if names.parse(name)[0].key not in BNB_KINDS:  # embeddings, norms, lm_head: untouched
                assert torch.equal(got4, w.float()) and torch.equal(got8, w.float()), name
                continue
            assert torch.equal(got4, independent_nf4(w)), name
            codes, scale = independent_int8(w)
            got_codes = torch.round(got8 / scale)
            assert torch.allclose(got8, got_codes * scale, rtol=1e-6, atol=0), name  # on the int8 grid
            # bitsandbytes scales in float16 arithmetic: a value on a rounding boundary may take the next code
            assert (got_codes - codes).abs().max() <= 1 and (got_codes == codes).float().mean() > 0.99, name
            checked += 1
    assert checked == SPEC.n_layers * (5 + 3 * SPEC.n_experts)  # q, k, v, o, router; w1, w2, w3 per expert


def test_the_scratch_directory_is_removed(src, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = CliRunner().invoke(main, ["compare", str(src), "--formats", "q8_0", "--chunks", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].split()[0] == "q8_0" and "verify defaults" in r.output
    assert list(tmp_path.iterdir()) == []


def test_missing_bitsandbytes_and_unknown_formats_are_one_line_errors(src, tmp_path, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(main, ["compare", str(src), "--formats", "q8_0,q9_9"])
    assert r.exit_code == 2 and "unknown format(s) q9_9; known:" in r.output and r.output.count("\n") == 1
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it gives `import`
    r = runner.invoke(main, ["compare", str(src), "--formats", "bnb-nf4", "--keep", str(tmp_path / "k")])
    assert r.exit_code == 2 and r.output == ("mxtools: error: bitsandbytes is not installed: "
                                             "pip install 'mxtools[bnb]' (bitsandbytes>=0.50)\n")
    assert not (tmp_path / "k").exists()
    (tmp_path / "k").mkdir()
    r = runner.invoke(main, ["compare", str(src), "--formats", "q8_0", "--keep", str(tmp_path / "k")])
    assert r.exit_code == 2 and r.output.endswith("k: --keep: output exists (use --force to replace it)\n"), r.output
    r = runner.invoke(main, ["compare", str(src), "--formats", "q8_0", "--keep", str(tmp_path / "k"), "--force"])
    assert r.exit_code == 2 and r.output.endswith("k: --keep needs a new directory; this one exists\n"), r.output


def test_default_formats_are_all_known():
    from mxtools.commands.compare import formats
    assert set(DEFAULT_FORMATS) <= set(formats())


def test_gguf_gptq_rows_are_the_mix_at_the_same_size(src, tmp_path_factory):
    """MIX+gptq (quantize --to gguf) is a candidate: a GGUF of the mix's own size, verified like the others."""
    text = text_head(tmp_path_factory, EVAL, 8000)
    result = run_compare(src, fmts="q4_0,q4_0+gptq", text=text, chunks=1, device="cpu")
    by = {r["format"]: r for r in result["rows"]}
    assert set(by) == {"q4_0", "q4_0+gptq"} and by["q4_0+gptq"]["bytes"] == by["q4_0"]["bytes"]
    assert by["q4_0+gptq"]["kld_mean"] > 0 and by["q4_0+gptq"]["outtype"] == by["q4_0"]["outtype"] == "q4_0"
