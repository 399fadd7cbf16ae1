"""`make bench`: every benchmark in turn; figures go to bench/out/*.json and are copied into docs/BENCHMARKS.md."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

for name in sys.argv[1:] or ["encoders", "convert", "perplexity", "quantize", "iquants", "gptq_expert", "gguf_gptq",
                             "gptqmodel_compare", "fuzz"]:
    script = HERE / f"{name}.py"
    if script.exists():
        print(f"== {name}", flush=True)
        sys.argv = [str(script)]  # each script's own defaults
        runpy.run_path(str(script), run_name="__main__")
