"""What a command's end means to a CI job: its exit code and one line on stderr.

    0  success
    1  a verification verdict failed (verify, and nothing else)
    2  bad input or usage: a library error (MxError), a refused output, a missing file, an unknown option,
       out of memory, Ctrl-C or SIGTERM (whatever was being written is removed)
    3  an unexpected internal error: one line naming the command and the exception; the full traceback goes to
       a log file (named in that line), or to stderr with MXTOOLS_DEBUG=1
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import click

from ..core.errors import MxError

OK, VERDICT_FAILED, BAD_INPUT, INTERNAL_ERROR = 0, 1, 2, 3

# What to reduce when a command runs out of memory.
MEMORY_HINTS = {
    "quantize": "--nsamples or --seqlen (or --device cpu when the accelerator is the one that is full)",
    "verify": "--ctx or --dtype f16 (or --device cpu when the accelerator is the one that is full)",
    "compare": "--chunks or --formats (or --device cpu when the accelerator is the one that is full)",
    "imatrix": "--ctx or --chunks (or --device cpu when the accelerator is the one that is full)",
    "convert": "--shard-size",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled or timed out), handled as Ctrl-C is: outputs in progress are removed."""


def _terminate(signum, frame):
    raise Terminated()


def fail(message: str, code: int = BAD_INPUT):
    """Print one line (a multi-line message is folded) and exit with `code`."""
    one_line = " ".join(line.strip() for line in message.splitlines())
    click.echo(f"mxtools: error: {one_line}", err=True)
    sys.exit(code)


def run_handled(command: str, call):
    """Run `call()` for `command`, turning every way it can end into an exit code and one line (the table above)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return call()
    except MxError as exc:
        fail(exc.line())
    except KeyboardInterrupt as exc:
        fail(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; nothing was left behind")
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except MemoryError as exc:  # torch.OutOfMemoryError (an accelerator's) is a RuntimeError: see below
        _out_of_memory(command, exc)
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes exit code 3
        if type(exc).__name__ == "OutOfMemoryError":
            _out_of_memory(command, exc)
        _internal(command, exc)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _out_of_memory(command: str, exc: BaseException):
    what = str(exc).splitlines()[0].strip() if str(exc).strip() else "an allocation"
    hint = MEMORY_HINTS.get(command, "a smaller input")
    fail(f"out of memory in `mxtools {command}` ({type(exc).__name__}: {what}); reduce {hint}")


def _internal(command: str, exc: BaseException):
    text = "".join(traceback.format_exception(exc))
    summary = (f"internal error in `mxtools {command}`: {type(exc).__name__}: "
               f"{str(exc).splitlines()[0] if str(exc) else ''}")
    if os.environ.get("MXTOOLS_DEBUG") == "1":
        click.echo(text, err=True, nl=False)
        fail(summary.rstrip(": "), INTERNAL_ERROR)
    log = _write_log(text)
    where = f"traceback in {log}" if log else "the traceback could not be saved"
    fail(f"{summary.rstrip(': ')} ({where}; MXTOOLS_DEBUG=1 prints it)", INTERNAL_ERROR)


def _write_log(text: str) -> Path | None:
    folder = Path(os.environ.get("MXTOOLS_LOG_DIR") or Path(tempfile.gettempdir()) / "mxtools-logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text, encoding="utf-8")
        return path
    except OSError:
        return None
