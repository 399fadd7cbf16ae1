"""How the peer benchmarks judge a checkpoint: `mxtools verify` on every bundled held-out text (EVAL_TEXTS: the
calibration domain and another one, every 512-token chunk) against the bf16 reference's log-probs, saved once per
text (bench/out/bases) and reused for every row; rows compared in pairs on the same chunks
(mxtools.verify.paired: the standard error of the mean per-chunk difference, and of the ratio by the delta method).
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from common import OUT, PY, ROOT

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import MODEL
from mxtools.core.defaults import EVAL_TEXTS
from mxtools.verify.paired import paired

THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def _env() -> dict:
    return {**os.environ, **THREADS, "PYTHONPATH": str(ROOT)}


def nice(cmd: list) -> list:
    """Benchmarks share the machine: every verify runs at lower priority."""
    return ["nice", "-n", "10", *map(str, cmd)]


BASES = OUT / "bases"  # shared by every benchmark that judges this way


def save_bases() -> dict[str, Path]:
    """The reference's log-probs on every chunk of each text, computed once (runs in parallel wait for it)."""
    BASES.mkdir(parents=True, exist_ok=True)
    bases = {name: BASES / f"{name}-base.bin" for name in EVAL_TEXTS}
    with open(BASES / "bases.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, text in EVAL_TEXTS.items():
            if not bases[name].exists():
                subprocess.run(nice([PY, "-m", "mxtools.cli", "verify", MODEL, "--text", text, "--device", "cpu",
                                     "--save-base", bases[name]]), check=True, capture_output=True, env=_env())
    return bases


def verify_texts(cand: Path, work: Path, name: str, outtype: str | None = None) -> dict[str, dict]:
    """`mxtools verify CAND --base BASE --text TEXT` on each text (ctx 512, all chunks): each text's report, pass
    or fail (exit 1 with a report is a failed threshold, still a measurement). `outtype` picks the thresholds (a
    float32 directory would otherwise be held to the f32 ones); the measurements do not depend on it."""
    bases, reports = save_bases(), {}
    for text_name, text in EVAL_TEXTS.items():
        out = work / f"verify-{name}-{text_name}.json"
        out.unlink(missing_ok=True)
        p = subprocess.run(nice([PY, "-m", "mxtools.cli", "verify", cand, "--base", bases[text_name], "--text", text,
                                 "--device", "cpu", "--json", out,
                                 *(["--thresholds-for", outtype] if outtype else [])]),
                           check=False, capture_output=True, text=True, env=_env())
        if not out.exists():
            raise RuntimeError(f"verify {cand} on {text_name} failed:\n{p.stderr[-3000:]}")
        reports[text_name] = json.loads(out.read_text())
    return reports


def quality(report: dict) -> dict:
    """One text's figures of a row."""
    s = report["stats"]
    return {"kld_mean": report["kld_mean"], "kld_unc": s.get("kld_unc"), "ppl_ratio": report["ppl_ratio"],
            "same_top_p": report["same_top_p"], "n_chunks": report.get("n_chunks"), "passed": report["passed"],
            "chunk_kld": s["chunk_kld"]}


def judge_row(label: str, path: Path, work: Path, name: str, timing: dict, outtype: str | None = None) -> dict:
    """A table row: the label, every text's figures, the quantizer's timing."""
    reports = verify_texts(path, work, name, outtype)
    return {"method": label, "texts": {t: quality(r) for t, r in reports.items()}, **timing}


def ratio(row: dict, ref: dict, text: str) -> dict:
    """row / ref on one text, paired over its chunks."""
    return paired(row["texts"][text]["chunk_kld"], ref["texts"][text]["chunk_kld"])


def table(rows: list[dict], ref: dict | None = None) -> str:
    """Markdown: per text the mean KLD ± its SE (over tokens) and, against `ref` (default the first row), the
    ratio ± its paired SE (over chunks); then the quantizer's CPU and wall seconds."""
    ref = ref or rows[0]
    texts = list(EVAL_TEXTS)
    head = "| method | " + " | ".join(f"{t} mean KLD | {t} ratio" for t in texts) + " | quantize CPU s | wall s |"
    lines = [head, "|" + "---|" * (2 + 2 * len(texts) + 1)]
    for r in rows:
        cells = []
        for t in texts:
            q, p = r["texts"][t], ratio(r, ref, t)
            cells += [f"{q['kld_mean']:.6f} ± {q['kld_unc']:.6f}", f"{p['ratio']:.3f} ± {p['ratio_se']:.3f}"]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r.get('cpu_s')} | {r.get('wall_s')} |")
    return "\n".join(lines) + f"\n\nratios: to {ref['method']}, paired over each text's chunks"


def keep_row(work: Path, name: str, result: dict) -> None:
    """Save one judged row under work/rows (rows run apart are tabled together) and print it."""
    (work / "rows" / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "quantize_log"}, default=str), flush=True)


def write_table(work: Path, names) -> None:
    """Every kept row of `names`, in that order, to work's sibling NAME.json, and their table to stdout."""
    rows = [json.loads((work / "rows" / f"{n}.json").read_text()) for n in names
            if (work / "rows" / f"{n}.json").exists()]
    (work.parent / f"{work.name}.json").write_text(json.dumps({"model": str(MODEL), "rows": rows}, indent=2,
                                                              default=str))
    if rows:
        print(table(rows))
