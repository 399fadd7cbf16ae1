"""The O_DIRECT staging writer and the buffer pool: exact bytes, errors raised in the caller, reuse."""

import errno
import gc
import os

import numpy as np
import pytest
import torch

from mxtools.io import direct
from mxtools.io.buffers import MIN_POOLED, BufferPool
from mxtools.io.direct import DirectFile


@pytest.mark.parametrize("sizes", [[0], [1], [4096], [4095, 1, 7], [direct.STAGE - 3, 10, direct.STAGE * 2 + 5]])
def test_direct_file_writes_exact_bytes(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    f = DirectFile(tmp_path / "out.bin")
    for p in parts:
        assert f.write(p) == p.size
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(p.tobytes() for p in parts)


def test_direct_file_falls_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)
    monkeypatch.setattr(direct.os, "open", no_direct)
    f = DirectFile(tmp_path / "out.bin")
    assert not f.direct
    f.write(b"abc" * 5000)
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == b"abc" * 5000


def test_background_write_error_reaches_the_caller(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(direct.os, "pwrite", full)
    f = DirectFile(tmp_path / "out.bin")
    with pytest.raises(OSError) as info:
        f.write(np.zeros(direct.STAGE * 3, dtype=np.uint8))
        f.close()
    assert info.value.errno == errno.ENOSPC
    f.abort()


def test_pool_reuses_given_buffers_and_forgets_lost_ones():
    pool = BufferPool()
    a = pool.take(MIN_POOLED * 2)
    addr = a.ctypes.data
    pool.give(a)
    b = pool.take(MIN_POOLED)  # a smaller request reuses the larger free buffer
    assert b.ctypes.data == addr and b.size == MIN_POOLED
    del a, b  # never given back: the pool keeps no reference
    gc.collect()
    assert len(pool._out) == 0
    c = pool.take(MIN_POOLED * 4)
    pool.give(np.empty(MIN_POOLED, dtype=np.uint8))  # not from the pool: ignored
    assert c.size == MIN_POOLED * 4 and len(pool._free) == 0


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float32])
def test_cast_for_write_narrows_pooled_buffers_in_place(src):
    from mxtools.io.buffers import POOL, cast_for_write, pooled_tensor
    x = torch.randn(300, 4099).to(src)  # 4099: an odd row length exercises the scalar tail
    w = pooled_tensor(x.shape, src).copy_(x)
    out = cast_for_write(w, torch.float16)
    assert out.data_ptr() == w.data_ptr() and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out.view(torch.int16), x.to(torch.float16).view(torch.int16))
    POOL.give(out)
    plain = x.clone()  # not from the pool: cast into a new buffer, the input untouched
    out = cast_for_write(plain, torch.float16)
    assert out.data_ptr() != plain.data_ptr() and torch.equal(plain, x)


def _tree_bytes(path):
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout,outtype", [("gguf", "f16"), ("gguf", "f32"), ("gguf", "q8_0"), ("gguf", "q4_k_m"),
                                            ("mistral", "f16"), ("hf", "f32"), ("hf", "bf16")])
def test_pooled_buffers_do_not_change_outputs(tmp_path, synth_dir, monkeypatch, layout, outtype):
    """With every read pooled (the small synth tensors are below the pool's size floor otherwise), buffers are
    reused, cast in place and given back across tensors: the output must equal the unpooled one byte for byte."""
    from mxtools.commands.convert import convert
    from mxtools.io import buffers
    src = synth_dir("hf", "bf16")
    suffix = ".gguf" if layout == "gguf" else ""
    convert(src, layout, tmp_path / f"plain{suffix}", outtype)
    monkeypatch.setattr(buffers, "MIN_POOLED", 1)
    monkeypatch.setattr(buffers, "POOL", buffers.BufferPool())
    for mod in ("mxtools.io.files", "mxtools.layouts.gguf", "mxtools.io.hf_dir", "mxtools.layouts.mistral"):
        monkeypatch.setattr(f"{mod}.POOL", buffers.POOL)
    convert(src, layout, tmp_path / f"pooled{suffix}", outtype)
    assert buffers.POOL._free, "the conversion should have given buffers back to the pool"
    assert _tree_bytes(tmp_path / f"pooled{suffix}") == _tree_bytes(tmp_path / f"plain{suffix}")
