"""Side by side: the same conversion and quantization jobs with this checkout and with another commit, in one run.

    python bench/ab.py --base REV [--head REV] [--reps 3] [--jobs f16,q8_0,q4_k_m,mistral,gptq]

Each REV is checked out in a temporary git worktree (its native kernels are this checkout's build, copied, when
it has the same C sources, else built there); without --head the head side is this working tree. Jobs alternate
base, head, base, head... so a noisy machine slows both sides alike; the table gives each side's median wall time and
peak RSS and the ratio head / base.
Conversions read `synth --preset 8x7b --layers 2` (6.3 GB bf16, bench/out); quantization is GPTQ int4 of the
bundled model with the base's default recipe on both sides and a small calibration (32 x 512 tokens).
Results: bench/out/ab.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import OUT, PY, ROOT, print_table, synth_8x7b_2layers, timed

from mxtools.core.bundled import CALIB, MODEL


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    native = ROOT / "mxtools" / "native"
    changed = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", rev, "--", "mxtools/native"], check=False)
    if changed.returncode:  # its own C sources: built there, with its own setup.py's flags
        subprocess.run([PY, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, check=True, capture_output=True)
        return where
    for lib in native.glob("_lib*.so"):
        shutil.copy(lib, where / "mxtools" / "native" / lib.name)
    return where


def _jobs(tree: Path, src: Path, out: Path, recipe: Path) -> dict[str, list]:
    cli = [PY, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); from mxtools.cli import main; main()"]
    convert = {t: [*cli, "convert", src, "--to", "gguf", "--outtype", t, "-o", out / f"{t}.gguf", "--force"]
               for t in ("f16", "q8_0", "q4_k_m")}
    return {**convert,
            "mistral": [*cli, "convert", src, "--to", "mistral", "-o", out / "mistral", "--force"],
            "gptq": [*cli, "quantize", MODEL, "--recipe", recipe, "--calib", CALIB, "--nsamples", "32", "--seqlen",
                     "512", "--device", "cpu", "-o", out / "gptq", "--force"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", help="a commit instead of this working tree")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", default="f16,q8_0,q4_k_m,mistral,gptq")
    args = ap.parse_args()
    src = synth_8x7b_2layers()
    wanted = args.jobs.split(",")
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        tmp = Path(tmp)
        base = _worktree(args.base, tmp / "base")
        head = _worktree(args.head, tmp / "head") if args.head else ROOT
        try:
            recipe = base / "mxtools" / "recipes" / "gptq-int4-g128.yaml"
            sides = {"base": _jobs(base, src, tmp / "out-base", recipe), "head": _jobs(head, src, tmp / "out-head",
                                                                                       recipe)}
            for side in sides:
                (tmp / f"out-{side}").mkdir()
            runs = {job: {"base": [], "head": []} for job in wanted}
            for _ in range(args.reps):
                for job in wanted:
                    for side in ("base", "head"):
                        runs[job][side].append(timed(sides[side][job]))
        finally:
            for tree in {base, head} - {ROOT}:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    rows = []
    for job, r in runs.items():
        med = {s: statistics.median(x["wall_s"] for x in r[s]) for s in r}
        rss = {s: max(x["peak_rss_mb"] for x in r[s]) for s in r}
        rows.append({"job": job, "base_s": round(med["base"], 2), "head_s": round(med["head"], 2),
                     "ratio": round(med["head"] / med["base"], 3), "base_rss_mb": round(rss["base"]),
                     "head_rss_mb": round(rss["head"]), "runs": r})
    head_name = args.head or "working tree"
    (OUT / "ab.json").write_text(json.dumps({"base": args.base, "head": head_name, "reps": args.reps, "rows": rows},
                                            indent=2))
    print_table(["job", f"base {args.base} median wall s", f"head {head_name} median wall s", "head / base",
                 "base peak RSS MB", "head peak RSS MB"],
                [[r[k] for k in ("job", "base_s", "head_s", "ratio", "base_rss_mb", "head_rss_mb")] for r in rows])


if __name__ == "__main__":
    main()
