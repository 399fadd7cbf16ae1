"""Block-output reconstruction for `quantize --to gguf` (quant/gguf_tune.py): the fp16 block scales, tuned.

Judges: gguf-py's independent decoder for what the tuned bytes dequantize to; llama.cpp for loading the file;
llama.cpp's own quantizer (through `convert`) for the types and shapes. Exact equalities where nothing is lossy.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from test_mixes import finite_logits, gguf_tensors, synth, write_pair

from mxtools.cli import main
from mxtools.commands.quantize import QuantizeSettings, run_quantize_gguf
from mxtools.io.ggml_blocks import NEEDS_IMATRIX, SUPPORTED, quantize
from mxtools.quant.gguf_gptq import GGUFQuant
from mxtools.quant.gguf_quantize import META_PREFIX
from mxtools.quant.gguf_tune import FIELDS, rounding, tuned_by_default
from mxtools.quant.gptq_tune import MIN_TRAIN
from mxtools.quant.mixes import MIXES, load_mix

ROWS, COLS = 8, 512
# The K-quants' integer sub-block scales and mins (ggml-common.h's block structs): the bytes they occupy.
SUB_SCALE_BYTES = {Q.Q2_K: range(16), Q.Q3_K: range(96, 108), Q.Q4_K: range(4, 16), Q.Q5_K: range(4, 16),
                   Q.Q6_K: range(192, 208)}


def _scale_bytes(qtype) -> set[int]:
    """Every byte of a block that holds a scale: the fp16 fields and the K-quants' sub-block scales."""
    fields = {b for at in FIELDS[qtype] for b in ((at, at + 1) if at is not None else range(48, 56))}
    return fields | set(SUB_SCALE_BYTES.get(qtype, ()))


def _rounding(qtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(ROWS, COLS, generator=gen)
    imat = torch.rand(COLS, generator=gen) + 0.5 if qtype in NEEDS_IMATRIX else None
    data = quantize(w, qtype, imat).reshape(ROWS, -1)
    res = GGUFQuant(qtype, data, None, None, None, "rtn")
    return rounding(res, "cpu", Kept), data


class Kept:
    """What the pipeline keeps of a result (gguf_quantize wraps it the same way): the GGUFQuant as .res."""

    def __init__(self, res):
        self.res = res


def _dequant(data, qtype) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(data, qtype).reshape(ROWS, COLS))


@pytest.mark.parametrize("qtype", list(SUPPORTED), ids=lambda t: t.name)
def test_block_scales_start_at_the_file_and_store_what_llama_cpp_reads(qtype):
    """Untouched: the weight is the file's and the bytes come back unchanged. Tuned: only the scales change (the
    fp16 fields, and the K-quants' integer sub-block scales and mins), and gguf-py dequantizes the new bytes to
    exactly the weight the descent saw as stored."""
    r, data = _rounding(qtype)
    assert torch.equal(r.weight(stored=True).detach(), _dequant(data, qtype))
    assert np.array_equal(r.result().res.data, data)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in r.params():
            p.uniform_(-0.6, 0.6, generator=gen)
    tuned = r.result().res.data
    assert torch.equal(r.weight(stored=True).detach(), _dequant(tuned, qtype))
    nbytes = SUPPORTED[qtype][1]
    moved = set(np.flatnonzero((tuned != data).reshape(-1, nbytes).any(0)).tolist())
    assert moved and moved <= _scale_bytes(qtype), moved
    if qtype in SUB_SCALE_BYTES:
        assert moved & set(SUB_SCALE_BYTES[qtype]), "the sub-block scales did not move"
    changed, total = r.changed(r.result())
    blocks = ROWS * COLS // SUPPORTED[qtype][0]
    assert total >= len(FIELDS[qtype]) * blocks and 0.5 * total < changed <= total


def test_a_matrix_kept_in_float_has_nothing_to_tune():
    """A type the mix keeps in float (F16: no block divides the row) is the file's weight and comes back as is."""
    w = 0.02 * torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(2))
    data = w.half().view(torch.uint8).numpy()
    r = rounding(GGUFQuant(Q.F16, data, None, None, None, "copy"), "cpu", Kept)
    assert r.params() == [] and torch.equal(r.weight(stored=True), w.half().float())
    assert r.result().res is r.res and r.changed(r.result()) == (0, 0)


def test_a_step_moves_every_factor_by_the_step_within_range():
    r, _ = _rounding(Q.Q4_K)
    r.weight().sum().backward()
    r.step(0.1)
    assert torch.allclose(r.a.detach().abs(), torch.full_like(r.a, 0.1)) and r.a.grad is None
    for _ in range(20):
        r.weight().sum().backward()
        r.step(0.1)
    assert float(r.a.detach().abs().max()) <= np.log(2) + 1e-6


# ---- quantize --to gguf ----

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-tune")
    return write_pair(root, synth(seed=5, n_layers=1))[1]


def test_tuned_file_changes_only_block_scales_lowers_the_held_out_error_and_loads(model, tmp_path):
    """One decoder layer: the tuned file has llama.cpp's types and shapes, its layer's matrices differ from the
    untuned file's only in the block scales, the held-out layer error went down, the GGUF records the steps, and
    llama.cpp runs it."""
    nsamples = 96
    runs = {}
    for iters in (0, 200):
        path = tmp_path / f"t{iters}.gguf"
        report = run_quantize_gguf(model, path, "q4_k_m", QuantizeSettings(nsamples=nsamples, seqlen=64,
                                                                           tune_iters=iters))
        runs[iters] = (report, *gguf_tensors(path))
    (_, meta0, plain), (report, meta, tuned) = runs[0], runs[200]
    t = report["layers"][0]["tune"]
    assert t["kept"] and t["holdout_after"] < 0.95 * t["holdout_before"], t  # measured: 0.89
    assert 0 < t["scales_changed"] <= 1
    assert meta[META_PREFIX + "tune_iters"] == 200 and META_PREFIX + "tune_iters" not in meta0
    assert {n: v[:2] for n, v in tuned.items()} == {n: v[:2] for n, v in plain.items()}
    layer = [n for n in tuned if n.startswith("blk.0.") and n.rsplit(".", 2)[-2] in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")]
    assert len(layer) == 7
    for name in layer:
        qtype = tuned[name][0]
        nbytes = SUPPORTED[qtype][1]
        a, b = (np.frombuffer(x[2], np.uint8).reshape(-1, nbytes) for x in (tuned[name], plain[name]))
        moved = set(np.flatnonzero((a != b).any(0)).tolist())
        assert moved and moved <= _scale_bytes(qtype), (name, moved)
    finite_logits(tmp_path / "t200.gguf")


def test_too_few_samples_skip_the_tuning_and_leave_no_record(model, tmp_path):
    report = run_quantize_gguf(model, tmp_path / "few.gguf", "q4_k_m",
                               QuantizeSettings(nsamples=MIN_TRAIN, seqlen=64, tune_iters=60))
    assert "skipped" in report["layers"][0]["tune"]
    assert META_PREFIX + "tune_iters" not in gguf_tensors(tmp_path / "few.gguf")[0]


def test_cli_tune_iters_is_used_and_recorded(model, tmp_path):
    """--tune-iters N reaches the pipeline (the GGUF records N and the summary reports the layer) and 0 turns the
    step off."""
    nsamples = str(MIN_TRAIN + 8)
    for iters in ("5", "0"):
        out = tmp_path / f"t{iters}.gguf"
        r = CliRunner().invoke(main, ["quantize", str(model), "--to", "gguf", "--outtype", "q4_k_m", "--nsamples",
                                      nsamples, "--seqlen", "64", "--tune-iters", iters, "-o", str(out)])
        assert r.exit_code == 0, r.output
        meta = gguf_tensors(out)[0]
        if iters == "5":
            assert meta[META_PREFIX + "tune_iters"] == 5 and "block-output reconstruction:" in r.output
        else:
            assert META_PREFIX + "tune_iters" not in meta and "block-output reconstruction" not in r.output


def test_tuned_by_default_up_to_five_bits_per_weight():
    """The step is on by default for the mixes whose default type stores at most 5 bits per weight (gguf-py's type
    sizes), off for q5_* and up (where it was measured level on the bundled model)."""
    on = {name for name in MIXES if tuned_by_default(load_mix(name).default)}
    assert on == set(MIXES) - {"q5_0", "q5_1", "q5_k_s", "q5_k_m", "q6_k", "q8_0"}
    bits = {t: 8 * GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0] for t in (Q.Q4_1, Q.Q5_0, Q.IQ4_XS)}
    assert bits == {Q.Q4_1: 5.0, Q.Q5_0: 5.5, Q.IQ4_XS: 4.25}


def test_a_five_bit_mix_is_not_tuned_unless_asked(model, tmp_path):
    """q5_k_m with enough samples to tune: no step (and no record) by default; --tune-iters still runs it."""
    nsamples = str(MIN_TRAIN + 8)
    for extra in ([], ["--tune-iters", "3"]):
        out = tmp_path / f"q5{len(extra)}.gguf"
        r = CliRunner().invoke(main, ["quantize", str(model), "--to", "gguf", "--outtype", "q5_k_m", "--nsamples",
                                      nsamples, "--seqlen", "64", *extra, "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert gguf_tensors(out)[0].get(META_PREFIX + "tune_iters") == (3 if extra else None)
