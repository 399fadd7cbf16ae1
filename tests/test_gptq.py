"""GPTQ core: quantizer, algorithm, v1 packing, checked against an independent dequantizer."""
import numpy as np
import pytest
import torch

from mxtools.io import gptq_pack
from mxtools.quant.gptq import (
    GPTQError,
    Hessian,
    QuantConfig,
    QuantResult,
    gptq_quantize,
    objective,
    rtn_quantize,
)

torch.set_num_threads(2)


def _calibration(n=2048, d=256, rank=48, seed=0):
    """Correlated inputs X = Z @ A plus noise, with a few heavy columns (like outlier features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    x += 0.1 * torch.randn(n, d, generator=g)
    x[:, [3, 77, 200]] *= 15
    return x


def _weight(out=512, d=256, seed=1):
    return 0.02 * torch.randn(out, d, generator=torch.Generator().manual_seed(seed))


def _hessian(x):
    hs = Hessian(x.shape[1])
    hs.add(x)
    return hs.matrix()


def _independent_dequant(tensors, bits):
    """W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros_field[g_idx[i], o] + 1)), unpacked by hand."""
    per, mask = 32 // bits, (1 << bits) - 1
    qw = tensors["qweight"].numpy().view(np.uint32).astype(np.int64)
    qz = tensors["qzeros"].numpy().view(np.uint32).astype(np.int64)
    scales = tensors["scales"].numpy().astype(np.float32)
    g_idx = tensors["g_idx"].numpy()
    n_in, n_out = qw.shape[0] * per, qw.shape[1]
    q = np.empty((n_in, n_out), np.int64)
    for i in range(n_in):  # input row i sits in word i // per at bit offset bits * (i % per)
        q[i] = (qw[i // per] >> (bits * (i % per))) & mask
    z = np.empty((qz.shape[0], n_out), np.int64)
    for o in range(n_out):  # output column o sits in word o // per of its group's row
        z[:, o] = ((qz[:, o // per] >> (bits * (o % per))) & mask) + 1
    w = scales[g_idx] * (q - z[g_idx]).astype(np.float32)
    return torch.from_numpy(w.T.copy())


def _random_result(bits, act_order, out=64, d=256, g=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    maxq = 2 ** bits - 1
    g_idx = torch.arange(d) // g
    if act_order:
        g_idx = g_idx[torch.randperm(d, generator=gen)]
    return QuantResult(
        q=torch.randint(0, maxq + 1, (out, d), generator=gen).to(torch.uint8),
        scales=torch.rand(d // g, out, generator=gen).half().float(),
        zeros=torch.randint(1, maxq + 1, (d // g, out), generator=gen).to(torch.int32),
        g_idx=g_idx.to(torch.int32), loss=None, damp=None, method="rtn", cfg=QuantConfig(bits=bits, group_size=g))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_unpack_round_trip(bits, act_order):
    r = _random_result(bits, act_order)
    t = gptq_pack.pack(r)
    assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
    assert t["qweight"].shape == (256 * bits // 32, 64)
    assert t["qzeros"].shape == (8, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (8, 64)
    q, zeros, scales, g_idx = gptq_pack.unpack(t, bits)
    assert torch.equal(q, r.q) and torch.equal(zeros, r.zeros) and torch.equal(g_idx, r.g_idx)
    assert torch.equal(scales.float(), r.scales)
    assert torch.equal(_independent_dequant(t, bits), r.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_independent_dequantizer_matches_bitwise(bits, sym, act_order):
    x, w = _calibration(n=512), _weight(out=64)
    r = gptq_quantize(w, _hessian(x), QuantConfig(bits=bits, sym=sym, act_order=act_order, group_size=64))
    t = gptq_pack.pack(r)
    deq = r.dequantize()
    assert torch.equal(_independent_dequant(t, bits), deq)
    assert torch.equal(gptq_pack.dequantize(t, bits), deq)
    assert torch.equal(r.scales, r.scales.half().float())  # codes were chosen for the stored fp16 scale


@pytest.mark.parametrize("bits,word", [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)])
def test_symmetric_qzeros_constant(bits, word):
    r = rtn_quantize(_weight(out=64), QuantConfig(bits=bits, group_size=128))
    qz = gptq_pack.pack(r)["qzeros"]
    assert qz.shape == (2, 64 * bits // 32)
    assert bool((qz == word).all())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(act_order):
    x, w = _calibration(), _weight()
    h = _hessian(x)
    cfg = QuantConfig(bits=4, group_size=128, act_order=act_order)
    g, r = gptq_quantize(w, h, cfg), rtn_quantize(w, cfg, h)
    ref = x @ w.T
    err_g = (ref - x @ g.dequantize().T).norm()
    err_r = (ref - x @ r.dequantize().T).norm()
    assert err_g < 0.8 * err_r
    assert g.loss < r.loss and g.method == "gptq" and r.method == "rtn"
    if act_order:  # groups follow descending diag(H): g_idx is not monotone, each group has 128 columns
        assert bool((g.g_idx[1:] < g.g_idx[:-1]).any())
        assert torch.bincount(g.g_idx.long()).tolist() == [128, 128]
    else:
        assert torch.equal(g.g_idx, (torch.arange(256) // 128).to(torch.int32))


@pytest.mark.parametrize("cfg", [QuantConfig(group_size=32), QuantConfig(group_size=64, sym=False, act_order=True),
                                 QuantConfig(group_size=256, static_groups=True, act_order=True)])
def test_loss_is_the_damped_objective(cfg):
    """GPTQ's summed per-column losses equal 0.5 tr(E H E^T) with the damped H: the OBS updates are exact."""
    x, w = _calibration(n=512), _weight(out=64)
    h = _hessian(x)
    r = gptq_quantize(w, h, cfg)
    hd = h.clone()
    hd.diagonal().add_(r.damp * float(h.diagonal().mean()))
    assert r.loss == pytest.approx(objective(w, r.dequantize(), hd), rel=1e-4)


def test_dead_columns():
    x, w = _calibration(n=512), _weight(out=64)
    x[:, [5, 6, 100]] = 0
    r = gptq_quantize(w, _hessian(x), QuantConfig(group_size=64, act_order=True))
    deq = r.dequantize()
    assert bool(torch.isfinite(deq).all()) and np.isfinite(r.loss)
    assert bool((deq[:, [5, 6, 100]] == 0).all())  # a column that never sees input is dropped


def test_zero_token_hessian_falls_back_to_rtn():
    hs = Hessian(256)
    hs.add(torch.zeros(0, 256))
    assert hs.n_tokens == 0 and not hs.matrix().any()
    w, cfg = _weight(out=64), QuantConfig()
    r = gptq_quantize(w, hs.matrix(), cfg)
    assert r.method == "rtn" and torch.equal(r.dequantize(), rtn_quantize(w, cfg).dequantize())


def test_non_positive_definite_hessian_raises_damping():
    x, w = _calibration(n=512), _weight(out=64)
    h = _hessian(x)
    h -= 0.05 * float(h.diagonal().mean()) * torch.eye(256)  # negative eigenvalues: Cholesky fails at 1%
    r = gptq_quantize(w, h, QuantConfig(damp=0.01))
    assert r.damp > 0.05 and bool(torch.isfinite(r.dequantize()).all())
    with pytest.raises(GPTQError, match="Cholesky"):
        gptq_quantize(w, -torch.eye(256), QuantConfig())


def test_group_size_minus_one():
    x, w = _calibration(n=512), _weight(out=64)
    r = gptq_quantize(w, _hessian(x), QuantConfig(group_size=-1))
    t = gptq_pack.pack(r)
    assert r.n_groups == 1 and not r.g_idx.any()
    assert t["scales"].shape == (1, 64) and t["qzeros"].shape == (1, 8)
    assert torch.equal(gptq_pack.dequantize(t, 4), r.dequantize())


def test_hessian_accumulates_tokens():
    x = torch.randn(3, 10, 16)
    hs = Hessian(16)
    hs.add(x[:1])
    hs.add(x[1:].to(torch.bfloat16).float())
    flat = torch.cat([x[:1].reshape(-1, 16), x[1:].to(torch.bfloat16).float().reshape(-1, 16)])
    assert hs.n_tokens == 30
    torch.testing.assert_close(hs.matrix(), 2 / 30 * flat.T @ flat)


def test_quantizer_formulas():
    w = torch.tensor([[-1.5, 0.25, 3.0, 0.0], [0.5, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    sym = rtn_quantize(w, QuantConfig(group_size=-1))
    torch.testing.assert_close(sym.scales[0], torch.tensor([6 / 15, 8 / 15, 2 / 15]).half().float())
    assert sym.zeros.tolist() == [[8, 8, 8]]
    asym = rtn_quantize(w, QuantConfig(group_size=-1, sym=False))
    assert asym.scales[0, 0] == torch.tensor(4.5 / 15).half().float()
    assert asym.zeros[0, 0] == 5  # round(1.5 / 0.3)
    # An all-positive row would get zero 0, which v1 cannot store: zero 1 with a wider step still covers it.
    assert asym.zeros[0, 1] == 1 and asym.scales[0, 1] == torch.tensor(4 / 14).half().float()
    assert (asym.dequantize()[1] - w[1]).abs().max() <= asym.scales[0, 1] / 2
    assert not asym.dequantize()[2].any()


def test_pack_refuses_zero_point_zero():
    r = _random_result(4, False)
    r.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero of 0"):
        gptq_pack.pack(r)


@pytest.mark.parametrize("kwargs", [{"bits": 3}, {"group_size": 0}, {"group_size": -2}, {"damp": -0.1},
                                    {"search": "mse"}])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        QuantConfig(**kwargs)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(_weight(out=8, d=200), QuantConfig(group_size=128))


def test_mse_search_does_not_increase_weight_error():
    w = _weight(out=64)
    w[:, 0] = 0.5  # an outlier the shrink search should clip
    plain = rtn_quantize(w, QuantConfig(group_size=64))
    mse = rtn_quantize(w, QuantConfig(group_size=64, mse=True))
    err = lambda r: (r.dequantize() - w).abs().pow(2.4).sum()
    assert err(mse) < err(plain)
    assert torch.equal(mse.scales, mse.scales.half().float())


def test_group_aware_order_keeps_groups_whole():
    """act_group_aware: the loop takes groups by descending largest diag(H) (columns inside by descending
    diag(H)), but g_idx stays i // g; on outlier columns it beats the natural order."""
    x, w = _calibration(), _weight()
    h = _hessian(x)
    plain = gptq_quantize(w, h, QuantConfig(group_size=64))
    gar = gptq_quantize(w, h, QuantConfig(group_size=64, act_group_aware=True))
    assert torch.equal(gar.g_idx, (torch.arange(256) // 64).to(torch.int32))
    assert objective(w, gar.dequantize(), h) < 0.9 * objective(w, plain.dequantize(), h)
    # With one group the group-aware order is act-order over the whole row, and g_idx is all zeros.
    one = gptq_quantize(w, h, QuantConfig(group_size=-1, act_group_aware=True))
    desc = gptq_quantize(w, h, QuantConfig(group_size=-1, act_order=True))
    assert torch.equal(one.q, desc.q) and torch.equal(one.scales, desc.scales) and not one.g_idx.any()


def test_hessian_search_lowers_the_weighted_rounding_error():
    """search="hessian" keeps a range factor only when it lowers the weighted squared error (1 included), so
    RTN's squared error can only drop; inside GPTQ it lowers the loss on outlier-heavy inputs."""
    w = _weight(out=64)
    w[:, 0] = 0.5
    plain, searched = (rtn_quantize(w, QuantConfig(group_size=64, search=s)) for s in ("minmax", "hessian"))
    err = lambda r: (r.dequantize() - w).square().view(64, 4, 64).sum(2)
    assert bool((err(searched) <= err(plain) * (1 + 1e-5)).all()) and err(searched).sum() < 0.99 * err(plain).sum()
    assert torch.equal(searched.scales, searched.scales.half().float())
    x, w = _calibration(), _weight()
    h = _hessian(x)
    g_plain, g_search = (gptq_quantize(w, h, QuantConfig(group_size=64, search=s)) for s in ("minmax", "hessian"))
    assert g_search.loss < g_plain.loss


@pytest.mark.parametrize("act_order", [False, True])
def test_refit_lowers_the_objective_with_the_codes_kept(act_order):
    x, w = _calibration(), _weight()
    h = _hessian(x)
    base = gptq_quantize(w, h, QuantConfig(group_size=64, act_order=act_order))
    refit = gptq_quantize(w, h, QuantConfig(group_size=64, act_order=act_order, refit=True))
    assert torch.equal(refit.q, base.q) and torch.equal(refit.g_idx, base.g_idx)
    assert torch.equal(refit.scales, refit.scales.half().float()) and bool((refit.scales > 0).all())
    assert refit.loss < 0.98 * base.loss
    hd = h.clone()
    hd.diagonal().add_(refit.damp * float(h.diagonal().mean()))
    assert refit.loss == pytest.approx(objective(w, refit.dequantize(), hd), rel=1e-6)


def test_all_levers_are_deterministic():
    x, w = _calibration(n=512), _weight(out=64)
    cfg = QuantConfig(group_size=64, act_group_aware=True, search="hessian", refit=True, damp=0.05)
    a, b = gptq_quantize(w, _hessian(x), cfg), gptq_quantize(w, _hessian(x), cfg)
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and a.loss == b.loss
