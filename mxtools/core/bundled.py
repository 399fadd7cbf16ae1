"""The bundled tiny trained Mixtral and its calibration / held-out evaluation text."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent.parent / "assets"
MODEL = ASSETS / "tiny-mixtral"
CALIB = ASSETS / "text" / "calib.txt"
EVAL = ASSETS / "text" / "eval.txt"
FICTION = ASSETS / "text" / "fiction.txt"  # held-out text of another domain (19th-century fiction)

