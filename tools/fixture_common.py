"""What the peer-fixture scripts (tools/*_fixture.py) share: their VERSIONS file and their command line. Each
script runs in the peer tool's own environment, with tools/ on its path (run as `python tools/<name>.py`)."""
from __future__ import annotations

import importlib.metadata as md
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def write_versions(out: Path, packages: Iterable[str], notes: Iterable[str]) -> None:
    """OUT/VERSIONS: each package's installed version, Python's, then the script's notes, a line each."""
    lines = [f"{p} {md.version(p)}" for p in packages] + [f"python {sys.version.split()[0]}", *notes]
    (out / "VERSIONS").write_text("\n".join(lines) + "\n")


def make_fixtures(doc: str, names: Iterable[str], quantize: Callable[[Path, Path, str], None],
                  write_expected: Callable[[Path, str], None], versions: Callable[[Path], None]) -> None:
    """`SCRIPT FLOAT_MODEL OUT [NAME]`: each named checkpoint (all of them without NAME) made anew under OUT/<name>,
    then OUT/VERSIONS; the script's docstring when the arguments are wrong."""
    if len(sys.argv) not in (3, 4):
        sys.exit(doc)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    for name in ([sys.argv[3]] if len(sys.argv) == 4 else names):
        shutil.rmtree(dst / name, ignore_errors=True)
        quantize(src, dst, name)
        write_expected(dst, name)
    versions(dst)
