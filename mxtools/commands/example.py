"""`mxtools example DIR`: the bundled tiny trained Mixtral and its texts, copied out ready for the demo pipeline."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..core.bundled import CALIB, EVAL, FICTION, MODEL
from ..core.errors import OutputError
from ..io.hf_dir import read_tokenizer, write_tokenizer_json


def write_example(out: Path, force: bool = False) -> Path:
    """DIR/model (HF layout), DIR/calib.txt and the held-out texts DIR/eval.txt (same domain) and DIR/fiction.txt
    (another domain), ready for the demo pipeline."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError("output exists and is not empty (use --force)", file=out)
    if not (MODEL / "model.safetensors").exists():
        raise OutputError("the bundled model is missing from this installation", file=MODEL)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(MODEL, out / "model")
    # the fast tokenizer, as every HF directory mxtools writes has it (transformers 5 without protobuf needs it)
    write_tokenizer_json(read_tokenizer(out / "model"), out / "model")
    shutil.copy(CALIB, out / "calib.txt")
    shutil.copy(EVAL, out / "eval.txt")
    shutil.copy(FICTION, out / "fiction.txt")
    return out
