"""Bad input gets one line naming the file and tensor, exit code 2, and leaves nothing behind."""
from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mxtools.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def assert_clean(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary output left behind"


def one_line_error(code, err, *must_contain):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("mxtools: error:"), err
    for s in must_contain:
        assert s in err, (s, err)


@pytest.fixture
def hf_copy(tmp_path, synth_dir):
    dst = tmp_path / "src"
    shutil.copytree(synth_dir("hf", "f32"), dst)
    return dst


def test_truncated_shard(hf_copy, tmp_path):
    f = hf_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    code, err = run("convert", hf_copy, "--to", "gguf", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, "model.safetensors", "truncated", "tensor ")
    assert_clean(tmp_path / "o.gguf")


def _rewrite(hf_dir, fn):
    f = hf_dir / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_tensor(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    code, err = run("convert", hf_copy, "--to", "mistral", "-o", tmp_path / "o")
    one_line_error(code, err, "missing 1 tensor", "model.layers.1.block_sparse_moe.experts.2.w3.weight")
    assert_clean(tmp_path / "o")


def test_unexpected_tensor(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda sd: sd.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    code, err = run("convert", hf_copy, "--to", "mistral", "-o", tmp_path / "o")
    one_line_error(code, err, "unexpected 1 tensor", "model.layers.0.mystery.weight")


def test_wrong_shape(hf_copy, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(hf_copy, lambda sd: sd.update({name: sd[name][:-1].clone()}))
    code, err = run("convert", hf_copy, "--to", "gguf", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, name, "shape", "model.safetensors")
    assert_clean(tmp_path / "o.gguf")


def test_not_mixtral(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    cfg.pop("num_local_experts")
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    code, err = run("convert", hf_copy, "--to", "gguf", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, "config.json", "not a Mixtral")


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/mxtools-pwned",))


def test_pickle_with_code_is_refused(tmp_path, synth_dir):
    src = tmp_path / "mistral"
    shutil.copytree(synth_dir("mistral", "f32"), src)
    (src / "consolidated.safetensors").unlink()
    torch.save({"tok_embeddings.weight": torch.zeros(2), "evil": Evil()}, src / "consolidated.00.pth")
    code, err = run("convert", src, "--to", "hf", "-o", tmp_path / "o")
    one_line_error(code, err, "consolidated.00.pth", "refused")
    assert not __import__("os").path.exists("/tmp/mxtools-pwned")
    assert_clean(tmp_path / "o")


def test_corrupt_gguf(tmp_path, synth_dir):
    g = tmp_path / "bad.gguf"
    g.write_bytes(synth_dir("gguf", "bf16").read_bytes()[: 400_000])
    code, err = run("convert", g, "--to", "hf", "-o", tmp_path / "o")
    one_line_error(code, err, "bad.gguf", "truncated")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    code, err = run("convert", tmp_path / "junk", "--to", "hf", "-o", tmp_path / "o")
    one_line_error(code, err, "no known Mixtral layout")


def test_existing_output_and_input_are_protected(tmp_path, synth_dir):
    src = synth_dir("hf", "f32")
    before = (src / "model.safetensors").read_bytes()
    (tmp_path / "exists.gguf").write_text("keep me")
    code, err = run("convert", src, "--to", "gguf", "-o", tmp_path / "exists.gguf")
    one_line_error(code, err, "exists", "--force")
    assert (tmp_path / "exists.gguf").read_text() == "keep me"
    code, err = run("convert", src, "--to", "hf", "-o", src, "--force")
    one_line_error(code, err, "overwrite")
    code, err = run("convert", src, "--to", "gguf", "-o", src / "inside.gguf")
    one_line_error(code, err, "inside")
    assert (src / "model.safetensors").read_bytes() == before and not (src / "inside.gguf").exists()


def test_sigterm_leaves_nothing(tmp_path, synth_dir, monkeypatch):
    """SIGTERM in the middle of writing (a cancelled CI job) is handled as Ctrl-C: exit 2, one line, no output."""
    import os
    import signal

    from mxtools.io import gguf_writer
    calls = {"n": 0}
    real = gguf_writer.GGUFStreamWriter.write

    def signalled(self, data):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, data)
    monkeypatch.setattr(gguf_writer.GGUFStreamWriter, "write", signalled)
    before = signal.getsignal(signal.SIGTERM)
    code, err = run("convert", synth_dir("hf", "f32"), "--to", "gguf", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, "terminated")
    assert_clean(tmp_path / "o.gguf")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's only


@pytest.mark.parametrize("exc,text", [(KeyboardInterrupt(), "interrupted"),
                                      (OSError(errno.ENOSPC, "No space left on device"), "no space left")])
def test_interrupt_and_full_disk_leave_nothing(tmp_path, synth_dir, monkeypatch, exc, text):
    from mxtools.io import gguf_writer
    calls = {"n": 0}
    real = gguf_writer.GGUFStreamWriter.write

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return real(self, data)
    monkeypatch.setattr(gguf_writer.GGUFStreamWriter, "write", failing)
    code, err = run("convert", synth_dir("hf", "f32"), "--to", "gguf", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, text)
    assert_clean(tmp_path / "o.gguf")
