"""Block-encoder throughput: mxtools' C encoders against llama.cpp's own (ggml_quantize_chunk from the
libggml-base that llama-cpp-python ships), one thread each, same 512 x 4096 float32 matrix, same process.
Checks the bytes are identical while at it. Writes bench/out/encoders.json. Run by `make bench`."""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's idle BLAS threads would count as CPU time

import numpy as np
from common import OUT, ROOT, print_table
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(ROOT / "tests"))
from ggml_clib import GGML, find_library

from mxtools.io.ggml_blocks import NEEDS_IMATRIX
from mxtools.native import quantize_rows

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
         Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_XXS, Q.IQ3_S, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_S, Q.IQ1_M]


def cpu_seconds(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main():
    ggml = GGML(find_library())
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 4096)) * 0.02).astype(np.float32)
    imatrix = rng.exponential(1.0, 4096).astype(np.float32)
    mb = x.nbytes / 1e6
    rows = []
    for qtype in TYPES:
        for label, qw in (("no", None), ("yes", imatrix)):
            if qw is None and qtype in NEEDS_IMATRIX:  # ggml aborts on these without an imatrix
                continue
            ref = ggml.quantize(x, int(qtype), qw)
            ours = np.empty_like(ref)
            quantize_rows(int(qtype), x, "f32", ours, qw)
            theirs_s = cpu_seconds(lambda t=int(qtype), qw=qw: ggml.quantize(x, t, qw))
            ours_s = cpu_seconds(lambda t=int(qtype), qw=qw, out=ours: quantize_rows(t, x, "f32", out, qw))
            rows.append({"type": qtype.name, "imatrix": label, "identical": bool((ours == ref).all()),
                         "mxtools_MB_per_cpu_s": round(mb / ours_s), "llama_cpp_MB_per_cpu_s": round(mb / theirs_s),
                         "speedup": round(theirs_s / ours_s, 2)})
    (OUT / "encoders.json").write_text(json.dumps(rows, indent=2))
    print_table(["type", "imatrix", "mxtools MB/CPU-s", "llama.cpp MB/CPU-s", "speedup", "bytes identical"],
                [[r[k] for k in ("type", "imatrix", "mxtools_MB_per_cpu_s", "llama_cpp_MB_per_cpu_s", "speedup",
                                 "identical")] for r in rows])


if __name__ == "__main__":
    main()
