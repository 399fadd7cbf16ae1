"""The parts every verb of the command line is built from: path options that declare themselves inputs or
outputs (so one check, run before any work, keeps every output off every input), deprecated spellings, sizes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .exits import run_handled


class InputPath(click.Path):
    """A file or directory the command reads. It must exist."""

    def __init__(self, dir_okay: bool = True):
        super().__init__(exists=True, dir_okay=dir_okay, path_type=Path)


class OutputPath(click.Path):
    """A file or directory the command writes (`stdout_ok`: '-' means standard output). Every option of this type
    is checked against every InputPath of the command, and against the other outputs, before the work starts."""

    def __init__(self, stdout_ok: bool = False):
        super().__init__(path_type=Path, allow_dash=stdout_ok)
        self.stdout_ok = stdout_ok


def _spelled(param: click.Parameter) -> str:
    return max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name


def paths_of(ctx: click.Context, kind: type) -> dict[str, Path]:
    """The command's given parameters of type `kind` (InputPath or OutputPath), by the option's spelling."""
    found = {}
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param.type, kind) and value is not None and str(value) != "-":
            for n, path in enumerate(value if isinstance(value, tuple) else (value,)):
                found[_spelled(param) + (f"[{n}]" if n else "")] = Path(path)
    return found


class Verb(click.Command):
    """A command whose outputs are checked before it runs and whose every ending is an exit code (cli.exits)."""

    def invoke(self, ctx: click.Context):
        def checked():
            from ..io.atomic import check_outputs
            check_outputs(paths_of(ctx, OutputPath), paths_of(ctx, InputPath), bool(ctx.params.get("force")))
            return super(Verb, self).invoke(ctx)
        _log_to_stderr()
        return run_handled(self.name, checked)


class _Notices(logging.Handler):
    """Notices the library logs (logger "mxtools", e.g. an assumed tokenizer): one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"mxtools: {record.getMessage()}", err=True)


def _log_to_stderr() -> None:
    log = logging.getLogger("mxtools")
    if not any(isinstance(h, _Notices) for h in log.handlers):
        log.addHandler(_Notices())
        log.setLevel(logging.INFO)
        log.propagate = False


def deprecated(new: str, old: str, value_new, value_old, verb: str):
    """The value of an option renamed from `old` to `new`: the old spelling still works, with a warning line."""
    if value_old is None or value_old is False:
        return value_new
    click.echo(f"mxtools: warning: {verb} {old} is deprecated and goes in the next release; use {new}", err=True)
    if value_new is not None and value_new is not False:
        raise click.UsageError(f"give {new} or {old}, not both")
    return value_old


def output_option(**kwargs):
    return click.option("-o", "--output", "out", type=OutputPath(), metavar="OUT", **kwargs)


def force_option():
    return click.option("--force", is_flag=True, help="replace outputs that exist")


def json_option(what: str):
    return click.option("--json", "json_out", type=OutputPath(stdout_ok=True), metavar="FILE", is_flag=False,
                        flag_value="-",
                        help=f"write {what} as JSON to FILE (alone or '-': standard output)")


def tokenizer_option():
    return click.option("--tokenizer", type=InputPath(dir_okay=False), metavar="FILE",
                        help="the SentencePiece tokenizer.model (or a tokenizer.json) to tokenize with (default: the "
                             "checkpoint's own; for one without, the Mixtral v1 tokenizer, said on stderr)")


def device_option():
    from ..core.defaults import DEVICES
    return click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
                        help="where the forward pass runs (auto: CUDA when there is one)")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None


def progress_bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, file=sys.stderr)


def write_json(report: dict, out: Path | None, force: bool = True) -> None:
    """The report as JSON: to stdout for '-', else to `out` written atomically."""
    import json
    text = json.dumps(report, indent=2, default=str)
    if out is None:
        return
    if str(out) == "-":
        click.echo(text)
        return
    from ..io.atomic import atomic_output
    with atomic_output(Path(out), directory=False, force=force) as tmp:
        tmp.write_text(text + "\n")
