"""The native casts give torch's values bit for bit (every bf16 pattern; f32 edge values; both code paths)."""

import numpy as np
import pytest
import torch

from mxtools import native
from mxtools.native import cast_tensor


def _all_bf16() -> torch.Tensor:
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    t = bits.view(torch.bfloat16)
    return t[~torch.isnan(t)]  # NaN payloads are not values; torch and F16C both keep them NaN


def _f32_edges() -> torch.Tensor:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504.0, 65520.0, 65519.99, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, -1e30,
                        np.inf, -np.inf], dtype=np.float32)
    x = np.concatenate([bits.view(np.float32), special, rng.standard_normal(4099).astype(np.float32)])
    return torch.from_numpy(x[~np.isnan(x)])


@pytest.mark.parametrize(("src", "dst"), [("bf16", torch.float16), ("bf16", torch.float32), ("f32", torch.float16)])
def test_cast_matches_torch(src, dst):
    x = _all_bf16() if src == "bf16" else _f32_edges()
    got, want = cast_tensor(x, dst), x.to(dst)
    assert got.dtype == dst and got.shape == x.shape
    assert torch.equal(got.view(torch.int16 if dst == torch.float16 else torch.int32),
                       want.view(torch.int16 if dst == torch.float16 else torch.int32))


def test_software_f16_path_matches_torch():
    """The fallback used on CPUs without F16C gives the same bits."""
    x = torch.cat([_f32_edges(), _all_bf16().float()])
    out = torch.empty(x.shape, dtype=torch.float16)
    native.lib().mx_f32_to_f16_soft(x.data_ptr(), out.data_ptr(), x.numel())
    assert torch.equal(out.view(torch.int16), x.to(torch.float16).view(torch.int16))


def test_cast_keeps_shape_and_handles_views_and_other_pairs():
    x = torch.randn(6, 10, dtype=torch.bfloat16)[:, ::2]  # non-contiguous
    assert torch.equal(cast_tensor(x, torch.float16), x.to(torch.float16))
    y = torch.randn(3, 4, dtype=torch.float16)
    assert torch.equal(cast_tensor(y, torch.bfloat16), y.to(torch.bfloat16))  # torch handles other pairs
