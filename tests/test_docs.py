"""Every project document a docstring or comment cites (docs/X.md, or the reference sheets' names FORMATS.md,
GPTQ.md, QUALITY.md) exists in docs/, with the section it names."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?:docs/([A-Z]+\.md)|\b(FORMATS\.md|GPTQ\.md|QUALITY\.md))(?:,? (?:section|s\.) ?(\d+))?")


def citations():
    for folder in ("mxtools", "tests", "bench", "examples"):
        for path in sorted(p for p in (ROOT / folder).rglob("*.py") if p != Path(__file__).resolve()):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in CITATION.finditer(line):
                    yield f"{path.relative_to(ROOT)}:{n}", m.group(1) or m.group(2), m.group(3)


def test_cited_documents_and_sections_exist():
    found = list(citations())
    assert len(found) >= 10  # the pattern still matches how the code cites
    for where, doc, section in found:
        path = ROOT / "docs" / doc
        assert path.is_file(), f"{where} cites {doc}, which is not in docs/"
        if section:
            assert re.search(rf"^## {section}\. ", path.read_text(encoding="utf-8"), re.MULTILINE), \
                f"{where} cites {doc} section {section}, which it does not have"
