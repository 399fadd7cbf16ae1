"""Shared helpers for the benchmarks: timed subprocesses (wall time, peak RSS), the llama.cpp sources."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VENDOR = ROOT / "bench" / "vendor"   # git-ignored: llama.cpp's converter is fetched, never committed
LLAMA_CPP_VERSION = "0.3.36"
PY = sys.executable


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` under /usr/bin/time -v; return wall seconds and peak RSS in MB (raise on failure)."""
    os.sync()  # the previous job's dirty pages are not this one's to write back
    full = ["/usr/bin/time", "-v", *map(str, cmd)]
    p = subprocess.run(full, capture_output=True, text=True, env={**os.environ, **(env or {})},
                       check=False)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): (\S+)", p.stderr).group(1)) for kind in ("User", "System"))
    return {"wall_s": round(secs, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss)}


def llama_cpp_source() -> Path:
    """llama.cpp's own sources from the llama-cpp-python sdist (pip cache or PyPI), unpacked under bench/vendor."""
    dest = VENDOR / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if not dest.exists():
        VENDOR.mkdir(parents=True, exist_ok=True)
        subprocess.run([PY, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(VENDOR)], check=True)
        sdist = next(VENDOR.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(VENDOR, filter="data")
    return dest / "vendor" / "llama.cpp"


def synth_8x7b_2layers() -> Path:
    """`mxtools synth --preset 8x7b --layers 2`: real per-layer dimensions, about 6.3 GB in bf16."""
    path = OUT / "synth-8x7b-2L"
    if not path.exists():
        subprocess.run([PY, "-m", "mxtools.cli", "synth", "--preset", "8x7b", "--layers", "2", "-o", str(path)],
                       check=True)
    return path


def print_table(header: list[str], rows: list[list]) -> None:
    """A markdown table, as docs/BENCHMARKS.md holds them."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
