"""PaddleNLP's own checkpoints (tests/fixtures/paddle, written by paddlepaddle and paddlenlp themselves; see its
README): the .pdparams reader against paddle.load's bytes, the CLI on save_pretrained's default, sharded and
safetensors outputs, and pickles that carry code or are damaged, which must be refused with exit 2 and one line,
run nothing and leave nothing behind. Paddle itself is never imported here."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fuzzing import run_isolated
from safetensors.torch import load_file

from mxtools.cli import main
from mxtools.core.errors import FormatError, UnsafePickleError
from mxtools.io.pdparams import PdparamsFile

FIX = Path(__file__).parent / "fixtures" / "paddle"
DIGESTS = json.loads((FIX / "tensors.json").read_text())
SHORT_TEXT = " ".join(["in the of to and a on at by is"] * 8)  # token ids inside the fixtures' 512-piece vocabulary
TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def one_line_error(code, err, *must_contain):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("mxtools: error:"), err
    for s in must_contain:
        assert s in err, (s, err)


def assert_clean(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary output left behind"


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


# ---------------------------------------------------------------- the reader against Paddle's own loader

@pytest.mark.parametrize("fname", sorted(DIGESTS))
def test_reader_gives_paddle_loads_bytes(fname):
    """Every tensor of every fixture: the shape, dtype and bytes paddle.load returned when the file was made."""
    f = PdparamsFile(FIX / fname)
    try:
        assert sorted(f.keys()) == sorted(DIGESTS[fname])
        for key, want in DIGESTS[fname].items():
            t = f.load(key)
            assert list(t.shape) == want["shape"] and t.dtype == TORCH[want["dtype"]], key
            assert hashlib.sha256(raw_bytes(t)).hexdigest() == want["sha256"], key
    finally:
        f.close()


def _numpy_state_dict() -> dict:
    """The pdparams fixture's tensors as numpy arrays (bfloat16 as uint16 bits, as Paddle stores it)."""
    f = PdparamsFile(FIX / "mixtral-pdparams" / "model_state.pdparams")
    try:
        return {k: (f.load(k).view(torch.int16).numpy().view(np.uint16) if f.load(k).dtype == torch.bfloat16
                    else f.load(k).numpy()) for k in f.keys()}
    finally:
        f.close()


class PaddleTensor:
    """How Paddle pickles a tensor outside a plain state dict: `tuple((internal name, ndarray))`."""

    def __init__(self, name, array):
        self.name, self.array = name, array

    def __reduce__(self):
        return tuple, ((self.name, self.array),)


def test_numpy2_pickles_ordered_dicts_fortran_order_and_tensor_tuples(tmp_path):
    """numpy 2's module name (numpy._core; the fixtures have numpy.core), an OrderedDict, Fortran-ordered arrays
    and Paddle's tensor tuples read as the same tensors."""
    sd = _numpy_state_dict()
    assert int(np.__version__.split(".")[0]) >= 2  # so pickle writes numpy._core.multiarray._reconstruct
    mixed = collections.OrderedDict((k, np.asfortranarray(a) if i % 3 == 0 else
                                     PaddleTensor(f"t_{i}", a) if i % 3 == 1 else a)
                                    for i, (k, a) in enumerate(sd.items()))
    data = pickle.dumps(mixed, protocol=4)
    assert b"numpy._core.multiarray" in data and b"OrderedDict" in data and b"builtins" in data
    (tmp_path / "m.pdparams").write_bytes(data)
    f = PdparamsFile(tmp_path / "m.pdparams")
    try:
        assert list(f.keys()) == list(sd)
        for k, a in sd.items():
            assert raw_bytes(f.load(k)) == np.ascontiguousarray(a).tobytes(), k
            assert tuple(f.load(k).shape) == a.shape
    finally:
        f.close()


# ---------------------------------------------------------------- the CLI on save_pretrained's outputs

@pytest.fixture(scope="module")
def hf_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paddle-hf")
    out = {}
    for name in ("mixtral-pdparams", "mixtral-sharded", "mixtral-safetensors"):
        code, err = run("convert", FIX / name, "--to", "hf", "-o", root / name)
        assert code == 0, err
        out[name] = root / name
    return out


def test_pdparams_convert_to_hf_bit_for_bit_as_safetensors(hf_outputs):
    """save_pretrained's default (.pdparams), its sharded form and its safetensors give the same HF files."""
    want = (hf_outputs["mixtral-safetensors"] / "model.safetensors").read_bytes()
    for name in ("mixtral-pdparams", "mixtral-sharded"):
        assert (hf_outputs[name] / "model.safetensors").read_bytes() == want, name
        assert (hf_outputs[name] / "config.json").read_bytes() == \
            (hf_outputs["mixtral-safetensors"] / "config.json").read_bytes()


def test_hf_output_is_paddles_weights_transposed(hf_outputs):
    """Each HF tensor is paddle.load's tensor (bytes by SHA-256), Linear weights transposed to [out, in]."""
    hf = load_file(hf_outputs["mixtral-pdparams"] / "model.safetensors")
    digests = DIGESTS["mixtral-pdparams/model_state.pdparams"]
    assert len(hf) == len(digests) == 41
    for name, t in hf.items():
        key = name.replace("model.", "mixtral.", 1)
        linear = t.dim() == 2 and "embed_tokens" not in name
        paddle_t = t.t().contiguous() if linear else t
        assert list(paddle_t.shape) == digests[key]["shape"], name
        assert hashlib.sha256(raw_bytes(paddle_t)).hexdigest() == digests[key]["sha256"], name


def test_u16_is_bfloat16_only_in_paddles_safetensors(hf_outputs, tmp_path):
    """PaddleNLP's numpy-format safetensors store bfloat16 as U16; an HF directory's U16 tensor is no float."""
    src = tmp_path / "hf"
    shutil.copytree(hf_outputs["mixtral-pdparams"], src)
    data = (src / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8:8 + n].count(b'"BF16"') == 41
    (src / "model.safetensors").write_bytes(data[:8] + data[8:8 + n].replace(b'"BF16"', b'"U16" ') + data[8 + n:])
    code, err = run("convert", src, "--to", "gguf", "-o", tmp_path / "o.gguf")
    one_line_error(code, err, "model.safetensors", "dtype uint16 is no float type")
    assert_clean(tmp_path / "o.gguf")


@pytest.mark.parametrize("name,weights", [("mixtral-pdparams", "pdparams"), ("mixtral-sharded", "pdparams"),
                                          ("mixtral-safetensors", "safetensors")])
def test_inspect_names_the_layout(name, weights):
    code, err = run("inspect", FIX / name)
    assert code == 0, err
    result = CliRunner().invoke(main, ["inspect", str(FIX / name)])
    assert f"paddle layout ({weights}), 41 tensors" in result.stdout
    assert "no problems found" in result.stdout


def test_gguf_and_gptq_from_pdparams(tmp_path):
    """GGUF (the same bytes as from PaddleNLP's safetensors) and a GPTQ checkpoint, through the CLI."""
    for name in ("mixtral-pdparams", "mixtral-safetensors"):
        code, err = run("convert", FIX / name, "--to", "gguf", "--outtype", "q8_0", "-o", tmp_path / f"{name}.gguf")
        assert code == 0, err
    assert (tmp_path / "mixtral-pdparams.gguf").read_bytes() == (tmp_path / "mixtral-safetensors.gguf").read_bytes()
    (tmp_path / "calib.txt").write_text(SHORT_TEXT)
    code, err = run("quantize", FIX / "mixtral-pdparams", "--calib", tmp_path / "calib.txt", "--nsamples", 2,
                    "--seqlen", 32, "--group-size", 32, "--device", "cpu", "-o", tmp_path / "gptq")
    assert code == 0, err
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4


# ---------------------------------------------------------------- pickles that carry code

class Reduce:
    """An object that pickles as a call of `fn(*args)` (what an attacker's pickle does when it is loaded)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _text(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _evil_pickles(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, what the refusal must name). Those in RUNS_CODE create `marker` when Python's own
    unpickler loads them (test_the_payloads_are_real)."""
    touch = f"touch {marker}"
    tensor = np.zeros((2, 2), np.float32)
    # getattr(pathlib.PosixPath(marker), "touch")(), by hand: pickle cannot write a call of a call's result
    getattr_call = (b"\x80\x02}" + _text("x") + b"cbuiltins\ngetattr\ncpathlib\nPosixPath\n" + _text(str(marker))
                    + b"\x85R" + _text("touch") + b"\x86R)Rs.")
    return {
        "os.system": (pickle.dumps({"w": tensor, "x": Reduce(os.system, touch)}, protocol=4), "posix.system"),
        "eval": (pickle.dumps({"x": Reduce(eval, f"open({str(marker)!r}, 'w')")}, protocol=4), "builtins.eval"),
        "nested global": (pickle.dumps({"w": tensor, "deep": ({"a": [[Reduce(os.system, touch)]]},)}, protocol=4),
                          "posix.system"),
        "builtins.getattr": (getattr_call, "builtins.getattr"),
        "numpy.load": (pickle.dumps({"x": Reduce(np.load, str(marker))}, protocol=4), "numpy.load"),
        "protocol 0 GLOBAL": (pickle.dumps({"x": Reduce(os.system, touch)}, protocol=0), "posix.system"),
        "INST": (b"(S'" + touch.encode() + b"'\nios\nsystem\n.", "INST"),
        "NEWOBJ": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "NEWOBJ"),
        "persistent id": (b"\x80\x02Pmarker\n.", "PERSID"),
        "subprocess": (pickle.dumps({"x": Reduce(__import__("subprocess").call, ["touch", str(marker)])},
                                    protocol=4), "subprocess"),
    }


RUNS_CODE = ["os.system", "eval", "nested global", "builtins.getattr", "protocol 0 GLOBAL", "INST", "subprocess"]


@pytest.mark.parametrize("case", RUNS_CODE)
def test_the_payloads_are_real(tmp_path, case):
    """Python's own unpickler, in a child process, does run each payload (so the refusals below mean something)."""
    marker = tmp_path / "marker"
    (tmp_path / "p").write_bytes(_evil_pickles(marker)[case][0])
    import subprocess
    code = f"import pickle; pickle.loads(open({str(tmp_path / 'p')!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("case", sorted(_evil_pickles(Path("m"))))
def test_pickle_with_code_is_refused_and_runs_nothing(tmp_path, case):
    marker = tmp_path / "marker"
    data, names = _evil_pickles(marker)[case]
    src = tmp_path / "src"
    shutil.copytree(FIX / "mixtral-pdparams", src)
    (src / "model_state.pdparams").write_bytes(data)
    for verb in (("convert", src, "--to", "hf", "-o", tmp_path / "o"), ("inspect", src)):
        code, err = run(*verb)
        one_line_error(code, err, str(src / "model_state.pdparams"), "refused", names)
        assert not marker.exists(), "the pickle's code ran"
    assert_clean(tmp_path / "o")
    with pytest.raises(UnsafePickleError):
        PdparamsFile(src / "model_state.pdparams")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "generation_config.json", "model_state.pdparams"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------- damaged pickles and pickle bombs

def _bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, what the one-line error must say). Each is bounded by the machine's limits (stack,
    memo, objects, lengths against the file) long before it could cost time or memory."""
    p4 = b"\x80\x04"
    return {
        "deep marks": (p4 + b"(" * 300_000 + b".", "nests too deeply"),
        "deep tuples": (p4 + b"N" + b"\x85" * 500_000 + b".", "holds a tuple"),
        "deep lists": (p4 + b"]" * 200_000 + b"a" * 199_999 + b".", "holds a list"),
        "self-appending list": (p4 + b"]\x94" + b"h\x00a" * 300_000 + b".", "holds a list"),
        "deep stack": (p4 + b"N" * 300_000 + b".", "stack over 262144"),
        "many objects": (p4 + b"N0" * 600_000 + b"}.", "over 1048576 opcodes"),
        "many frames": (p4 + (b"\x95" + struct.pack("<Q", 9)) * 1_100_000 + b"}.", "over 1048576 opcodes"),
        "memo flood": (p4 + b"N" + b"r" + b"".join(struct.pack("<I", i) + b"r" for i in range(300_000))[:-1] + b".",
                       "memo over 262144"),
        "BINBYTES8 2**62": (p4 + b"}" + _text("w") + b"\x8e" + struct.pack("<Q", 2**62) + b"x" * 64, "runs past"),
        "BINUNICODE8 2**40": (p4 + b"\x8d" + struct.pack("<Q", 2**40) + b"abc", "over 1048576"),
        "BINUNICODE 2**32-1": (p4 + b"X" + struct.pack("<I", 2**32 - 1) + b"abc", "over 1048576"),
        "BINBYTES past the end": (p4 + b"B" + struct.pack("<I", 1 << 20) + b"x" * 1000, "runs past"),
        "LONG4 2**31": (p4 + b"\x8b" + struct.pack("<I", 2**31) + b"\x01" * 16, "over 64"),
        "FRAME 2**63": (p4 + b"\x95" + struct.pack("<Q", 2**63) + b"}.", "runs past"),
        "memo index never written": (p4 + b"j" + struct.pack("<I", 2**32 - 1) + b".", "memo entry"),
        "no STOP": (p4 + b"}" + _text("w") + b"N" + b"s", "truncated"),
        "empty": (b"", "too short"),
        "protocol 9": (b"\x80\x09}.", "protocol"),
        "not a pickle": (b"PK\x03\x04" + b"\x00" * 60, "opcode"),
    }


@pytest.mark.parametrize("case", sorted(_bombs()))
def test_damaged_pickles_and_bombs_exit_2_in_bounded_time_and_memory(tmp_path, case):
    """Through the CLI in a forked child with the fuzz suites' time and memory limits (tests/fuzzing.py)."""
    data, says = _bombs()[case]
    src = tmp_path / "src"
    shutil.copytree(FIX / "mixtral-pdparams", src)
    (src / "model_state.pdparams").write_bytes(data)
    res = run_isolated(["convert", src, "--to", "hf", "-o", tmp_path / "o"])
    assert res.problem() is None and res.code == 2, (res.problem(), res.stderr)
    assert str(src / "model_state.pdparams") in res.stderr and says in res.stderr, res.stderr
    assert_clean(tmp_path / "o")


@pytest.mark.parametrize("cut", [1, 2, 11, 200, 5000, 100_000, 382_000, 382_947])
def test_truncated_pdparams(tmp_path, cut):
    src = tmp_path / "src"
    shutil.copytree(FIX / "mixtral-pdparams", src)
    data = (src / "model_state.pdparams").read_bytes()
    (src / "model_state.pdparams").write_bytes(data[:cut])
    code, err = run("convert", src, "--to", "hf", "-o", tmp_path / "o")
    one_line_error(code, err, str(src / "model_state.pdparams"), "truncated" if cut >= 2 else "too short")
    assert_clean(tmp_path / "o")


class BadArray:
    """An ndarray's pickle with a chosen state: (shape, numpy dtype, Fortran order, raw bytes)."""

    def __init__(self, shape, dtype, data, fortran=False):
        self.state = (1, shape, dtype, fortran, data)

    def __reduce__(self):
        return np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


def _changed(sd: dict, key: str, value) -> bytes:
    return pickle.dumps({**sd, key: value}, protocol=4)


def test_tensors_that_do_not_fit_the_config_or_the_format(tmp_path):
    """Shapes against the config, dtypes that are no float, dtypes Paddle never writes, data of the wrong size,
    entries that are no array: each one line naming file and tensor."""
    sd = _numpy_state_dict()
    key = "mixtral.layers.1.self_attn.k_proj.weight"
    w = sd[key]
    cases = {
        "shape": (_changed(sd, key, np.zeros((64, 16), np.uint16)), "does not match the config"),
        "int32": (_changed(sd, key, w.astype(np.int32)), "no float type"),
        "complex": (_changed(sd, key, w.astype(np.complex64)), "not one Paddle writes"),
        "big-endian": (_changed(sd, key, w.astype(">f4")), "not one Paddle writes"),
        "data size": (_changed(sd, key, BadArray((64, 32), np.dtype("f4"), b"\0" * 300)), "does not match shape"),
        "string entry": (_changed(sd, key, "weights"), "not a numpy array"),
        "missing": (pickle.dumps({k: v for k, v in sd.items() if k != key}, protocol=4), "missing 1 tensor"),
    }
    for label, (data, says) in cases.items():
        src = tmp_path / label
        shutil.copytree(FIX / "mixtral-pdparams", src)
        (src / "model_state.pdparams").write_bytes(data)
        code, err = run("convert", src, "--to", "hf", "-o", tmp_path / "o")
        one_line_error(code, err, says, "model_state.pdparams" if label != "missing" else str(src))
        assert "k_proj" in err, (label, err)
        assert_clean(tmp_path / "o")


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4])
def test_machine_reads_plain_values_as_pythons_pickler_writes_them(tmp_path, protocol):
    """Every opcode the machine knows, against Python's own pickler: plain values come back equal."""
    from mxtools.io.pickle_vm import Blob, Machine
    obj = {"a": 1, "b": [1.5, -3, 2**70, -(2**40), True, None, "x\ny\u00e9", 65535, 2**31 - 1], "c": (1, 2),
           "d": {"e": "f" * 300, 7: ((),)}, "shared": [[1]] * 3, "bytes": b"ab"}
    obj["self"] = obj["b"]
    (tmp_path / "p").write_bytes(pickle.dumps(obj, protocol=protocol))
    fd = os.open(tmp_path / "p", os.O_RDONLY)
    try:
        if protocol < 3:  # bytes are text through _codecs.encode before protocol 3
            with pytest.raises(FormatError, match="protocol 2 or older"):
                Machine(fd, os.fstat(fd).st_size, "p").run()
            del obj["bytes"]
            (tmp_path / "p").write_bytes(pickle.dumps(obj, protocol=protocol))
            os.close(fd)
            fd = os.open(tmp_path / "p", os.O_RDONLY)
        got = Machine(fd, os.fstat(fd).st_size, "p").run()
    finally:
        os.close(fd)
    assert got == obj and got["self"] is got["b"]
    big = tmp_path / "big"
    big.write_bytes(pickle.dumps({"k": b"z" * 1000}, protocol=4))
    fd = os.open(big, os.O_RDONLY)
    try:
        blob = Machine(fd, os.fstat(fd).st_size, "big").run()["k"]
    finally:
        os.close(fd)
    assert isinstance(blob, Blob) and big.read_bytes()[blob.offset:blob.offset + blob.nbytes] == b"z" * 1000
