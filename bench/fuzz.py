"""The long fuzz run of `make bench`: every reader, through the CLI's error boundary.

Two parts, each given a share of the time budget:
  1. coverage-guided (atheris / libFuzzer), one subprocess per single-file reader (GGUF, tokenizer.model,
     imatrix GGUF and .dat, saved base, recipe, PaddleNLP's .pdparams): the CLI runs in-process on each input
     libFuzzer derives from the seed file; a broken contract is logged with its input, a hang (-timeout) or
     runaway memory (-rss_limit_mb) ends the subprocess with libFuzzer's artifact and is counted as a failure;
  2. seeded mutations in forked children (tests/fuzzing.run_isolated), which measure each case's peak RSS:
     the single-file readers (tests/test_fuzz_files.py) and the directory readers (tests/test_fuzz_dirs.py)
     at many more seeds than `make test` runs.
Writes bench/out/fuzz.json: cases run, failures (with the saved inputs under bench/out/fuzz/), worst peak RSS
(a forked case's includes the warm parent's, parent_rss_mb; a coverage process's is its whole run's).

    python bench/fuzz.py [--minutes 12] [--coverage-share 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "bench" / "out"
WORK = OUT / "fuzz"
sys.path.insert(0, str(ROOT / "tests"))

# reader -> (seed file key in build_files, feed name in test_fuzz_files.feeds)
COVERAGE_TARGETS = {"gguf": ("gguf", "inspect"), "tokenizer": (None, "tokenizer"), "imatrix": ("imatrix", "imatrix"),
                    "dat": ("dat", "dat"), "base": ("base", "base"), "recipe": ("recipe", "recipe"),
                    "pdparams": ("pdparams", "pdparams")}


def main(minutes: float = 12.0, coverage_share: float = 0.5) -> dict:
    import importlib.util

    import test_fuzz_files as ff
    if importlib.util.find_spec("atheris") is None:
        raise SystemExit("bench/fuzz.py needs atheris (pip install atheris) for its coverage-guided part")
    WORK.mkdir(parents=True, exist_ok=True)
    seeds = ff.build_files(WORK / "seeds")
    (WORK / "seeds.json").write_text(json.dumps({k: str(v) for k, v in seeds.items()}))
    budget = minutes * 60
    coverage = {}
    per_target = budget * coverage_share / len(COVERAGE_TARGETS)
    for reader in COVERAGE_TARGETS:
        coverage[reader] = _coverage_run(reader, per_target)
        print(f"coverage {reader}: {coverage[reader]['runs']} runs, {len(coverage[reader]['failures'])} failures",
              flush=True)
    forked = _forked_run(ff, seeds, budget * (1 - coverage_share))
    failures = [f"{r}: {f}" for r, c in coverage.items() for f in c["failures"]] + forked["failures"]
    result = {"minutes": minutes, "coverage_guided": coverage, "forked": forked,
              "parent_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "cases_run": sum(c["runs"] for c in coverage.values()) + forked["cases"],
              "failures": failures,
              "worst_peak_rss_mb": max([forked["worst_peak_rss_mb"]] + [c["peak_rss_mb"] for c in coverage.values()])}
    (OUT / "fuzz.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k in ("cases_run", "worst_peak_rss_mb")}
                     | {"failures": len(failures)}))
    return result


# ---------------------------------------------------------------- 1. coverage-guided (atheris)

def _coverage_run(reader: str, seconds: float) -> dict:
    """Run the atheris target for `reader` until `seconds` are spent, restarting after a hang or memory
    failure (each restart keeps the corpus libFuzzer grew)."""
    work = WORK / f"cov-{reader}"
    corpus, artifacts = work / "corpus", work / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(exist_ok=True)
    status = work / "status.json"
    runs, failures, peak, deadline = 0, [], 0.0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 5:
        before = set(artifacts.iterdir())
        p = subprocess.run([sys.executable, __file__, "--coverage-child", reader, str(work),
                            f"-max_total_time={int(left)}", "-timeout=30", "-rss_limit_mb=4096",
                            f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)],
                           capture_output=True, text=True, check=False)
        st = json.loads(status.read_text()) if status.exists() else {}
        runs, peak = runs + st.get("runs", 0), max(peak, st.get("peak_rss_mb", 0.0))
        failures += st.get("failures", [])
        new = sorted(set(artifacts.iterdir()) - before)
        if p.returncode and not new:
            failures.append(f"fuzzer exited {p.returncode}: {p.stderr[-400:]}")
            break
        failures += [f"{a.name.split('-')[0]} (libFuzzer: input {a})" for a in new]
        status.unlink(missing_ok=True)
    return {"runs": runs, "failures": failures, "peak_rss_mb": round(peak, 1), "seconds": round(seconds)}


def _coverage_child(reader: str, work: Path, libfuzzer_args: list[str]) -> None:
    """The atheris process: instrument mxtools, seed the corpus, judge every input, log to status.json."""
    import atheris
    with atheris.instrument_imports(include=["mxtools"]):
        from click.testing import CliRunner

        from mxtools.cli import main as cli
    import test_fuzz_files as ff
    from fuzzing import Outcome
    seeds = {k: Path(v) for k, v in json.loads((WORK / "seeds.json").read_text()).items()}
    feed = ff.feeds(seeds, work / "run")[COVERAGE_TARGETS[reader][1]]
    key = COVERAGE_TARGETS[reader][0]
    seed = seeds[key] if key else seeds["hf"] / "tokenizer.model"
    corpus = Path(libfuzzer_args[-1])
    if not any(corpus.iterdir()):
        (corpus / "seed").write_bytes(seed.read_bytes())
    state = {"runs": 0, "failures": [], "peak_rss_mb": 0.0, "t": 0.0}
    status = work / "status.json"

    def flush():
        state["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        status.write_text(json.dumps({k: v for k, v in state.items() if k != "t"}))

    def one_input(data: bytes) -> None:
        feed.target.write_bytes(data)
        res = CliRunner().invoke(cli, [str(a) for a in feed.argv])
        tb = "" if res.exception is None or isinstance(res.exception, SystemExit) else repr(res.exception)
        why = ff.judge(Outcome(feed.argv, res.exit_code, res.stderr, traceback=tb), feed.target, feed.outputs,
                       feed.also_named)
        state["runs"] += 1
        if why:
            saved = work / f"failure-{state['runs']}"
            saved.write_bytes(data)
            state["failures"].append(f"{why[:300]} (input {saved})")
        if why or time.monotonic() - state["t"] > 2:
            state["t"] = time.monotonic()
            flush()

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    try:
        atheris.Fuzz()
    finally:
        flush()


# ---------------------------------------------------------------- 2. forked, seeded mutations

def _forked_run(ff, seeds: dict, seconds: float) -> dict:
    """Seeded cases in forked children, round-robin over the readers until `seconds` are spent."""
    import test_fuzz_dirs as fd
    deadline = time.monotonic() + seconds
    rng = random.Random(int(time.time()))
    feeds = ff.feeds(seeds, WORK / "forked")
    files = {  # feed -> endless mutations of its seed
        "inspect": lambda: ff.gguf_mutations(seeds[rng.choice(["gguf", "q8_0", "legacy"])], 1, rng),
        "convert": lambda: ff.gguf_mutations(seeds["gguf"], 1, rng),
        "tokenizer": lambda: ff.byte_mutations(seeds["hf"] / "tokenizer.model", 1, rng),
        "imatrix": lambda: ff.gguf_mutations(seeds["imatrix"], 1, rng),
        "dat": lambda: ff.byte_mutations(seeds["dat"], 1, rng),
        "base": lambda: ff.base_mutations(seeds["base"], 2, rng),
        "recipe": lambda: ff.recipe_mutations(seeds["recipe"], 1, rng),
        "pdparams": lambda: ff.pdparams_mutations(seeds["pdparams"], 1, rng),
    }
    dirs = fd.build_sources(WORK / "dir-sources")
    dir_cases = list(fd.cases(dirs, seed=rng.randrange(2**32), scale=4.0))
    rng.shuffle(dir_cases)
    n, worst, failures, codes = 0, 0.0, [], {}
    while time.monotonic() < deadline:
        for name, gen in files.items():
            for label, data in gen():
                res, why = ff.run_case(feeds[name], data)
                worst, n = max(worst, res.peak_rss_mb), n + 1
                codes[str(res.code)] = codes.get(str(res.code), 0) + 1
                if why is not None:
                    saved = WORK / f"forked-failure-{n}-{feeds[name].target.name}"
                    saved.write_bytes(data)
                    failures.append(f"{name} {label}: {why[:300]} (input {saved})")
        if dir_cases:
            label, src, changes = dir_cases.pop()
            (WORK / "dir-work").mkdir(exist_ok=True)
            failures += fd.run_case(label, src, changes, WORK / "dir-work", fd.verbs_for(n))
            worst, n = max(worst, getattr(fd.run_case, "worst_rss_mb", 0.0)), n + 1
    return {"cases": n, "failures": failures, "worst_peak_rss_mb": round(worst, 1), "single_file_exit_codes": codes}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--coverage-child":
        _coverage_child(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
    else:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--minutes", type=float, default=float(os.environ.get("MXTOOLS_FUZZ_MINUTES", "12")))
        ap.add_argument("--coverage-share", type=float, default=0.5)
        args = ap.parse_args(sys.argv[1:] if Path(sys.argv[0]).name == "fuzz.py" else [])
        main(args.minutes, args.coverage_share)
