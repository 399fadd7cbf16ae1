"""Outputs appear whole or not at all: written under a temporary name and renamed at the end."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from ..errors import OutputError


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an existing output unless forced, and any output that is, holds or sits inside an input."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise OutputError("output would overwrite or sit inside the input", file=out)
    if out.exists() and not force:
        raise OutputError("output exists (use --force to replace it)", file=out)


@contextlib.contextmanager
def atomic_output(out: Path, directory: bool):
    """Yield a temporary sibling path; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OutputError("no space left on device", file=out) from None
        raise


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        _remove(out)
    os.replace(tmp, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
