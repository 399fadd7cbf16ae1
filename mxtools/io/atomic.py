"""Outputs appear whole or not at all: written under a temporary name and renamed at the end.

Two processes asked for the same output never mix their bytes: each holds an exclusive lock on a sibling lock
file for the whole write, so the second one stops at once with an error, and the lock is released (the lock file
removed) when the writer finishes or dies."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path

from ..core.errors import OutputError

#: how deep an input directory is searched for symlinks whose targets also count as inputs (HF cache snapshots)
_SYMLINK_SCAN_LIMIT = 10_000


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an existing output unless forced, and any output that is, holds or sits inside an input.

    Symlinks are resolved, including those inside an input directory (a Hugging Face cache snapshot is a folder
    of links into `blobs/`): their targets are inputs too."""
    out = Path(out).resolve()
    for src in _input_paths(inputs):
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise OutputError("output would overwrite or sit inside the input", file=out)
    if out.exists() and not force:
        raise OutputError("output exists (use --force to replace it)", file=out)


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path], force: bool) -> None:
    """The check every output of a command passes before any work starts. `outputs` and `inputs` map an option's
    name (as the user typed it: "-o", "--json", "SRC") to its path. An output that is an input, a link to one, or
    inside an input directory is refused, as is one that is, holds or sits inside another output; each error
    names both options. An existing output is refused unless `force`."""
    outs = [(name, Path(path), Path(path).resolve()) for name, path in outputs.items()]
    for name, path, out in outs:
        for in_name, src_path in inputs.items():
            for src in _input_paths([src_path]):
                if out == src or src.is_relative_to(out) or out.is_relative_to(src):
                    raise OutputError(f"{name} would overwrite or sit inside the input {in_name} ({src_path})",
                                      file=path)
    for k, (name, path, out) in enumerate(outs):
        for other, other_path, resolved in outs[k + 1:]:
            if out == resolved or out.is_relative_to(resolved) or resolved.is_relative_to(out):
                raise OutputError(f"{name} and {other} would write to the same place ({other_path})", file=path)
    for name, path, out in outs:
        if out.exists() and not force:
            raise OutputError(f"{name}: output exists (use --force to replace it)", file=path)


def _input_paths(inputs: list[Path]) -> list[Path]:
    paths = []
    for src in map(Path, inputs):
        paths.append(src.resolve())
        if src.is_dir():
            for n, entry in enumerate(src.rglob("*")):
                if n >= _SYMLINK_SCAN_LIMIT:
                    break
                if entry.is_symlink():
                    paths.append(entry.resolve())
    return paths


@contextlib.contextmanager
def atomic_output(out: Path, directory: bool, force: bool = True):
    """Yield a temporary sibling path; on success it replaces `out`, on any failure it is removed.

    Holds the output's lock throughout; with force=False an output that appeared meanwhile (another process
    finished it) is refused rather than replaced."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if out.exists() and not force:
            raise OutputError("output exists (use --force to replace it)", file=out)
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


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive, non-blocking lock on `.NAME.lock` beside `out`; the file is removed on release."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError("another process is writing this output", file=out) from None
        # the holder before us may have removed the file after we opened it: lock the file that is there now
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def _replace(tmp: Path, out: Path) -> None:
    """Put `tmp` in place of `out`; a replaced directory is first moved aside, so `out` is never half gone."""
    if (out.is_dir() and not out.is_symlink()) or (tmp.is_dir() and out.exists()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
