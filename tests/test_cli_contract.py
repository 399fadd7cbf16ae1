"""The command line's contract, checked from its own definitions: every option that writes is an OutputPath and
can never destroy an input; exit codes 0/1/2/3; renamed options work under both spellings; the README's option
table is `--help`'s; the help answers without torch or the C extension."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import write_synth

from mxtools.cli import main
from mxtools.cli.params import InputPath, OutputPath

ROOT = Path(__file__).resolve().parents[1]
VERBS = dict(sorted(main.commands.items()))


def run(*args, env=None):
    r = CliRunner(env=env).invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def digest(paths) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return out


def spelled(param: click.Parameter) -> str:
    return max(param.opts, key=len) if isinstance(param, click.Option) else param.name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One existing file or directory for every kind of input a verb takes."""
    root = tmp_path_factory.mktemp("inputs")
    model = write_synth(root / "model", "hf")
    text = root / "text.txt"
    text.write_text("Mixtral is a sparse mixture of experts. " * 50)
    (root / "other.txt").write_text("Another text. " * 50)
    (root / "imatrix.gguf").write_bytes(b"not read: the outputs are refused first")
    (root / "base.logprobs").write_bytes(b"not read either")
    return {"model": model, "text": text, "other": root / "other.txt", "imatrix": root / "imatrix.gguf",
            "base": root / "base.logprobs", "tokenizer": model / "tokenizer.model"}


# Every verb's inputs: argument or option spelling -> which input. A verb's every InputPath must be here (checked).
INPUTS = {
    "convert": {"src": "model", "--imatrix": "imatrix", "--tokenizer": "tokenizer"},
    "quantize": {"src": "model", "--imatrix": "imatrix", "--calib": "text", "--tokenizer": "tokenizer"},
    "imatrix": {"model_path": "model", "--calib": "text", "--text": "other", "--tokenizer": "tokenizer"},
    "verify": {"candidate": "model", "--reference": "model", "--text": "text", "--base": "base",
               "--tokenizer": "tokenizer"},
    "compare": {"model_path": "model", "--calib": "text", "--text": "other"},
    "inspect": {"path": "model"},
    "synth": {},
    "example": {},
}
EXTRA = {"convert": ["--to", "gguf"], "quantize": ["--to", "gguf", "--outtype", "q4_k_m"]}  # required choices
OLD_SPELLINGS = {"imatrix": {"--text": "--calib"}}  # an old spelling given in place of the new one, never both


def params_of(verb: str, kind: type) -> list[click.Parameter]:
    return [p for p in VERBS[verb].params if isinstance(p.type, kind)]


def invocation(verb: str, inputs: dict, outputs: dict[click.Parameter, Path], old: str | None = None) -> list[str]:
    """The verb with every input given (`old`: this old spelling instead of its new one) and `outputs`."""
    olds = OLD_SPELLINGS.get(verb, {})
    skip = {olds[old]} if old in olds else set(olds)
    args = [verb]
    for p in VERBS[verb].params:
        name = spelled(p)
        if isinstance(p.type, InputPath) and name not in skip:
            path = inputs[INPUTS[verb][name]]
            args += [str(path)] if isinstance(p, click.Argument) else [name, str(path)]
    for p, path in outputs.items():
        args += [str(path)] if isinstance(p, click.Argument) else [spelled(p), str(path)]
    return args + EXTRA.get(verb, [])


def test_every_path_parameter_says_whether_it_reads_or_writes():
    """A new path option must be an InputPath or an OutputPath, so the output check cannot miss it."""
    for verb, cmd in VERBS.items():
        for p in cmd.params:
            if isinstance(p.type, (click.Path, click.File)):
                assert type(p.type) in (InputPath, OutputPath), f"{verb} {spelled(p)}: use InputPath or OutputPath"
        ins = {spelled(p) for p in params_of(verb, InputPath)}
        assert ins == set(INPUTS[verb]), f"{verb}: list its inputs in INPUTS ({sorted(ins)})"


@pytest.mark.parametrize("verb", [v for v in VERBS if INPUTS[v]])
def test_no_output_option_can_destroy_an_input(verb, inputs, tmp_path):
    """Every output option pointed at every input, at a link to it and inside it: exit 2, one line naming both,
    and every input byte-identical afterwards."""
    before = digest(set(inputs.values()))
    outs = params_of(verb, OutputPath)
    assert outs, verb
    for out in outs:
        others = {p: tmp_path / f"fresh-{spelled(p).strip('-')}" for p in outs if p is not out and p.required}
        for in_name, which in INPUTS[verb].items():
            target = inputs[which]
            link = tmp_path / f"link-{which}"
            if not link.exists():
                link.symlink_to(target)
            places = [target, link] + ([target / "inside.json"] if target.is_dir() else [])
            for place in places:
                code, _, err = run(*invocation(verb, inputs, {**others, out: place}, in_name), "--force")
                lines = err.strip().splitlines()
                assert code == 2, (verb, spelled(out), place, err)
                assert lines[-1].startswith("mxtools: error: ") and "input" in lines[-1], lines
                assert spelled(out) in lines[-1] or out.name in lines[-1], lines[-1]
    assert digest(set(inputs.values())) == before


@pytest.mark.parametrize("verb", [v for v in VERBS if len([p for p in VERBS[v].params
                                                          if isinstance(p.type, OutputPath)]) > 1])
def test_two_outputs_of_one_command_cannot_be_the_same(verb, inputs, tmp_path):
    outs = params_of(verb, OutputPath)
    same = tmp_path / "same"
    for a in outs:
        for b in outs:
            if a is b or (isinstance(a, click.Argument) or isinstance(b, click.Argument)):
                continue
            code, _, err = run(*invocation(verb, inputs, {a: same, b: same}))
            assert code == 2 and "same place" in err, (verb, spelled(a), spelled(b), err)
            assert not same.exists()


def test_an_existing_report_is_kept_without_force(inputs, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    code, _, err = run("inspect", inputs["model"], "--json", report)
    assert code == 2 and "--force" in err and report.read_text() == "{}"
    code, _, err = run("inspect", inputs["model"], "--json", report, "--force")
    assert code == 0 and json.loads(report.read_text())["layout"] == "hf"


# ---------------------------------------------------------------- exit codes

def test_an_internal_error_exits_3_with_one_line_and_a_log(inputs, tmp_path, monkeypatch):
    import mxtools.commands.inspect as verb

    def broken(*a, **k):
        raise RuntimeError("injected\nsecond line")
    monkeypatch.setattr(verb, "describe", broken)
    code, _, err = run("inspect", inputs["model"], env={"MXTOOLS_LOG_DIR": str(tmp_path)})
    assert code == 3
    assert len(err.strip().splitlines()) == 1
    assert "internal error in `mxtools inspect`: RuntimeError: injected" in err
    logs = list(tmp_path.glob("error-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in err
    code, _, err = run("inspect", inputs["model"], env={"MXTOOLS_DEBUG": "1"})
    assert code == 3 and "Traceback" in err and err.strip().splitlines()[-1].startswith("mxtools: error: internal")


def test_out_of_memory_exits_2_naming_the_option_that_reduces_it(inputs, monkeypatch):
    import mxtools.commands.quantize as verb

    def starved(*a, **k):
        raise MemoryError("cannot allocate 5.6 GB")
    monkeypatch.setattr(verb, "run_quantize", starved)
    code, _, err = run("quantize", inputs["model"], "-o", inputs["model"].parent / "q")
    assert code == 2 and "out of memory in `mxtools quantize`" in err and "--nsamples" in err
    assert len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(inputs):
    assert run("convert", inputs["model"], "-o", "x")[0] == 2  # --to missing
    assert run("inspect", inputs["model"], "--no-such-option")[0] == 2


def test_a_missing_c_extension_is_one_line_from_the_verb_that_needs_it(inputs, tmp_path, monkeypatch):
    import importlib.util

    from mxtools import native
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mxtools.native._lib"
                        else real(name, *a))
    native.lib.cache_clear()
    try:
        code, _, err = run("convert", inputs["model"], "--to", "gguf", "--outtype", "q8_0", "-o", tmp_path / "q.gguf")
    finally:
        monkeypatch.undo()
        native.lib.cache_clear()
    assert code == 2 and "native kernels are not built" in err and "pip install -e ." in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q.gguf").exists()


# ---------------------------------------------------------------- renamed options

def test_renamed_options_work_under_both_spellings(inputs, tmp_path):
    code_new, _, err_new = run("example", "-o", tmp_path / "a")
    code_old, _, err_old = run("example", tmp_path / "b")
    assert code_new == code_old == 0 and "deprecated" in err_old and "deprecated" not in err_new
    assert digest([tmp_path / "a"]).keys() != {} and \
        [Path(k).name for k in digest([tmp_path / "a"])] == [Path(k).name for k in digest([tmp_path / "b"])]
    common = ["--preset", "tiny", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
              "--kv-heads", "2", "--layout", "gguf"]
    assert run("synth", *common, "--n-experts", "4", "--outtype", "f16", "-o", tmp_path / "n.gguf")[0] == 0
    code, _, err = run("synth", *common, "--experts", "4", "--dtype", "f16", tmp_path / "o.gguf")
    assert code == 0 and err.count("deprecated") == 3
    assert (tmp_path / "n.gguf").read_bytes() == (tmp_path / "o.gguf").read_bytes()
    code, _, err = run("synth", *common, "--experts", "4", "--n-experts", "4", "-o", tmp_path / "x.gguf")
    assert code == 2 and "not both" in err
    code, out_flag, _ = run("inspect", inputs["model"], "--json", "--no-weights")
    code2, out_dash, _ = run("inspect", inputs["model"], "--json", "-", "--no-weights")
    assert code == code2 == 0 and json.loads(out_flag) == json.loads(out_dash)


def test_imatrix_takes_the_calibration_text_as_calib_and_text(inputs, tmp_path):
    a = run("imatrix", inputs["model"], "--calib", inputs["text"], "--ctx", 64, "-o", tmp_path / "a.gguf")
    b = run("imatrix", inputs["model"], "--text", inputs["text"], "--ctx", 64, "-o", tmp_path / "b.gguf")
    assert a[0] == b[0] == 0 and "deprecated" in b[2] and "deprecated" not in a[2]
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_a_checkpoint_without_tokenizer_is_said_and_tokenizer_chooses(inputs, tmp_path):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(inputs["model"], bare)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    code, _, err = run("imatrix", bare, "--calib", inputs["text"], "--ctx", 64, "-o", tmp_path / "a.gguf")
    assert code == 0 and "no tokenizer" in err and "--tokenizer" in err
    code, _, err = run("imatrix", bare, "--calib", inputs["text"], "--ctx", 64, "--tokenizer", inputs["tokenizer"],
                       "-o", tmp_path / "b.gguf")
    assert code == 0 and "no tokenizer" not in err
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()  # the same v1 tokenizer


# ---------------------------------------------------------------- help

def test_every_option_has_help_and_every_verb_an_example():
    for verb, cmd in VERBS.items():
        missing = [spelled(p) for p in cmd.params if isinstance(p, click.Option) and not p.hidden and not p.help]
        assert not missing, f"{verb}: options without help: {missing}"
        assert cmd.epilog and f"mxtools {verb}" in cmd.epilog, verb


def test_help_loads_neither_torch_nor_the_c_extension():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom mxtools.cli import main\n"
            "for args in [['--help'], ['--version']] + [[v, '--help'] for v in main.commands]:\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('mxtools.native')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def cli_table() -> str:
    """The README's command-line table, made from the definitions."""
    rows = ["| command | arguments and options |", "|---|---|"]
    for verb, cmd in VERBS.items():
        args = [p.make_metavar(click.Context(cmd)) if isinstance(p, click.Argument)
                else "/".join(p.opts + p.secondary_opts)
                for p in cmd.params if not getattr(p, "hidden", False) and p.name not in ("out_old",)]
        rows.append(f"| `{verb}` | {' '.join(f'`{a}`' for a in args)} |")
    return "\n".join(rows) + "\n"


def test_the_readme_table_is_the_help():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert cli_table() in readme, "regenerate with: python tests/test_cli_contract.py\n" + cli_table()


if __name__ == "__main__":
    print(cli_table(), end="")


def test_quantize_to_gguf_takes_an_iquant_mix(inputs, tmp_path):
    """GPTQ's Hessian is the i-quant mix's importance: no --imatrix needed for IQ2_XS (tests/test_gguf_gptq_iq.py
    checks the file against llama-quantize's)."""
    code, out, err = run("quantize", inputs["model"], "--to", "gguf", "--outtype", "iq2_xs", "--calib",
                         inputs["text"], "--nsamples", "2", "--seqlen", "32", "-o", tmp_path / "q.gguf")
    assert code == 0 and "iq2_xs (gptq)" in out + err and (tmp_path / "q.gguf").stat().st_size > 0, err
