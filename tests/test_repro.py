"""Reproducible, concurrent-safe outputs: the same input gives the same bytes whatever the run, the thread count
or the I/O buffer settings; two writers of one output never mix; Hugging Face cache snapshots (folders of
symlinks) read like plain folders, and the output-inside-input rule sees through the links."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mxtools.cli import main
from mxtools.core.errors import OutputError
from mxtools.io import buffers, direct
from mxtools.io.atomic import atomic_output

ALL_CORES = os.cpu_count() or 1


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def tree_digest(path: Path) -> dict[str, str]:
    """Relative file name -> sha256 of its bytes (a file is its own single entry)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def io_settings(monkeypatch):
    """Switch the I/O buffers between their smallest and largest settings."""
    def apply(kind: str):
        pool = buffers.BufferPool()
        monkeypatch.setattr(buffers, "POOL", pool)
        for mod in ("mxtools.io.files", "mxtools.layouts.gguf", "mxtools.io.hf_dir", "mxtools.layouts.mistral"):
            monkeypatch.setattr(f"{mod}.POOL", pool)
        if kind == "smallest":  # nothing pooled, one staging buffer of one page, one write in flight
            monkeypatch.setattr(buffers, "MIN_POOLED", 1 << 62)
            monkeypatch.setattr(direct, "STAGE", direct.ALIGN)
            monkeypatch.setattr(direct, "IN_FLIGHT", 1)
        else:  # everything pooled, large staging buffers, many writes in flight
            monkeypatch.setattr(buffers, "MIN_POOLED", 1)
            monkeypatch.setattr(direct, "STAGE", 64 << 20)
            monkeypatch.setattr(direct, "IN_FLIGHT", 8)
    return apply


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


CONVERSIONS = [("gguf", "f16"), ("gguf", "q4_k_m"), ("gguf", "q8_0"), ("mistral", "bf16"), ("hf", "f16")]


@pytest.mark.parametrize("layout,outtype", CONVERSIONS)
def test_convert_is_byte_identical_across_threads_and_buffer_settings(tmp_path, synth_dir, io_settings, threads,
                                                                     layout, outtype):
    src = synth_dir("hf", "bf16")
    digests = []
    for i, (n, io) in enumerate([(1, "smallest"), (2, "largest"), (ALL_CORES, "smallest"), (1, "largest")]):
        threads(n)
        io_settings(io)
        out = tmp_path / f"o{i}"
        code, err = run("convert", src, "--to", layout, "--outtype", outtype, "-o", out)
        assert code == 0, err
        digests.append(tree_digest(out))
    assert all(d == digests[0] for d in digests[1:]), "outputs differ between runs/threads/buffer settings"


def test_synth_and_example_are_byte_identical_across_runs(tmp_path, threads):
    digests = {"synth": [], "example": []}
    for i, n in enumerate([1, ALL_CORES]):
        threads(n)
        assert run("synth", tmp_path / f"s{i}", "--layout", "gguf", "--layers", "1", "--hidden", "64",
                   "--intermediate", "96", "--heads", "4", "--kv-heads", "2", "--experts", "4", "--seed", "3")[0] == 0
        digests["synth"].append(tree_digest(tmp_path / f"s{i}"))
        assert run("example", tmp_path / f"e{i}")[0] == 0
        digests["example"].append(tree_digest(tmp_path / f"e{i}"))
    for verb, (a, b) in digests.items():
        assert a == b, f"{verb} differs between runs"


def test_imatrix_and_gptq_are_byte_identical_across_runs_and_threads(tmp_path, synth_dir, threads):
    src = synth_dir("hf", "f32")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    imat, gptq = [], []
    for i, n in enumerate([1, ALL_CORES, 1]):
        threads(n)
        code, err = run("imatrix", src, "--text", calib, "--ctx", "64", "-o", tmp_path / f"i{i}.gguf")
        assert code == 0, err
        imat.append(tree_digest(tmp_path / f"i{i}.gguf"))
        code, err = run("quantize", src, "--calib", calib, "--nsamples", "4", "--seqlen", "64", "--group-size", "32",
                        "--device", "cpu", "-o", tmp_path / f"q{i}")
        assert code == 0, err
        gptq.append(tree_digest(tmp_path / f"q{i}"))
    assert imat[0] == imat[1] == imat[2]
    assert gptq[0] == gptq[1] == gptq[2]


# ---- two writers of one output ----

def test_a_second_writer_of_the_same_output_is_refused_while_the_first_writes(tmp_path, synth_dir):
    out = tmp_path / "o.gguf"
    with atomic_output(out, directory=False) as tmp:
        tmp.write_bytes(b"first writer's bytes")
        code, err = run("convert", synth_dir("hf", "f32"), "--to", "gguf", "-o", out)
        assert code == 2 and "another process is writing this output" in err and str(out) in err, err
    assert out.read_bytes() == b"first writer's bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"], "lock or temporary file left behind"


def test_an_output_finished_by_another_writer_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    out.write_text("done by another process")
    with pytest.raises(OutputError, match="output exists"), atomic_output(out, directory=True, force=False):
        pass
    assert out.read_text() == "done by another process"


def test_two_processes_writing_one_output_at_once(tmp_path, synth_dir):
    src, out, ref = synth_dir("hf", "f32"), tmp_path / "o.gguf", tmp_path / "ref.gguf"
    assert run("convert", src, "--to", "gguf", "--outtype", "q8_0", "-o", ref)[0] == 0
    cmd = [sys.executable, "-m", "mxtools.cli", "convert", str(src), "--to", "gguf", "--outtype", "q8_0", "-o",
           str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    err = results[1][1].strip()
    assert err.count("\n") == 0 and err.startswith("mxtools: error:") and str(out) in err, err
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "ref.gguf"]


# ---- Hugging Face cache snapshots ----

@pytest.fixture
def hf_cache(tmp_path, synth_dir):
    """models--x--y/{blobs/<sha>, snapshots/<rev>/<name> -> ../../blobs/<sha>}, as huggingface_hub lays it out."""
    root = tmp_path / "hub" / "models--mistralai--Mixtral-test"
    blobs, snap = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(synth_dir("hf", "f32").iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


def test_a_hf_cache_snapshot_reads_like_a_plain_folder(tmp_path, synth_dir, hf_cache):
    assert run("convert", hf_cache, "--to", "gguf", "-o", tmp_path / "a.gguf")[0] == 0
    assert run("convert", synth_dir("hf", "f32"), "--to", "gguf", "-o", tmp_path / "b.gguf")[0] == 0
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert all(p.is_symlink() for p in hf_cache.iterdir()), "the snapshot was modified"


def test_outputs_through_symlinks_onto_snapshot_blobs_are_refused(tmp_path, hf_cache):
    blobs = hf_cache.parents[1] / "blobs"
    before = tree_digest(blobs)
    link = tmp_path / "looks-new.gguf"
    link.symlink_to(next(iter(sorted(blobs.iterdir()))))
    for out in (link, blobs):
        code, err = run("convert", hf_cache, "--to", "gguf", "-o", out, "--force")
        assert code == 2 and "overwrite or sit inside the input" in err, (out, err)
    assert tree_digest(blobs) == before
