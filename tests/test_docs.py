"""Every project document a docstring or comment cites (docs/X.md, or the reference sheets' names FORMATS.md,
GPTQ.md, QUALITY.md) exists in docs/, with the section it names; FORMATS.md's name and block tables are the
code's and gguf-py's."""
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


def _section(doc: str, number: int) -> str:
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    return re.split(r"^## \d+\. ", text, flags=re.MULTILINE)[number]


def _rows(section: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| kind key") and not line.startswith("| type")]


def test_formats_name_tables_are_the_code_s():
    from mxtools.layouts import gguf, hf
    for number, table in ((1, hf.TABLE), (5, gguf.TABLE)):
        doc = {row[0]: row[1].split("`")[1] for row in _rows(_section("FORMATS.md", number)) if "`" in row[1]}
        assert doc == table.rows, f"FORMATS.md section {number}"


def test_formats_block_table_is_ggml_s():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    rows = [r for r in _rows(_section("FORMATS.md", 6)) if re.match(r"Q\w+ \(\d+\)$", r[0])]
    assert len(rows) == 10
    for row in rows:
        name, qid = re.match(r"(\w+) \((\d+)\)", row[0]).groups()
        t = GGMLQuantizationType[name]
        assert int(qid) == t and (int(row[1]), int(row[2])) == GGML_QUANT_SIZES[t], row[0]


def test_formats_iquant_table_is_ggml_s():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from mxtools.io.ggml_blocks import SUPPORTED
    rows = [r for r in _rows(_section("FORMATS.md", 6)) if re.match(r"IQ\w+ \(\d+\)$", r[0])]
    named = set()
    for row in rows:
        name, qid = re.match(r"(\w+) \((\d+)\)", row[0]).groups()
        t = GGMLQuantizationType[name]
        assert int(qid) == t and (int(row[1]), int(row[2])) == GGML_QUANT_SIZES[t], row[0]
        assert float(row[3]) == 8 * GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0], row[0]
        named.add(t)
    assert named == {t for t in SUPPORTED if t.name.startswith("IQ")}  # every i-quant the encoders write
