"""The docs tell the truth about the repository: every measured number names the committed results file it comes
from, every results file a doc names exists, and no doc speaks of material or machines a user cannot reach.

A *measurement* is a number with a unit of time, rate or speedup (``3.4 µs``, ``1.32x``, ``790 TFLOP/s``,
``4 min 10 s``, ``+33%``). The block that holds it (a paragraph, list or table), or the block just before it,
must name a file under ``benchmarks/results/``; a line that calls its numbers a setting, an assumption or a
target (``timeout``, ``assumed``, ``default``...) holds no measurement.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

NUMBER = r"[~+−-]?\d+(?:\.\d+)?(?:\s?[–-]\s?\d+(?:\.\d+)?)?"
UNIT = r"(?:x\b|%|\s?(?:µs|us|ms|ns|s|sec|seconds?|min|minutes?|TFLOP/s|GFLOP/s|GB/s|TB/s|tokens/s)\b)"
MEASUREMENT = re.compile(rf"(?<![\w./=])({NUMBER}{UNIT})")
SETTING = re.compile(r"assum|timeout|default|data sheet|target|limit|budget|set to|configur", re.IGNORECASE)
"""Words that mark a number as a setting, an assumption or a goal rather than a measurement."""
RESULTS = re.compile(r"benchmarks/results/((?:[\w.\-]+/)?[\w.\-]+\.json)")
UNREACHABLE = {
    r"\blent\b": "a machine lent to the authors",
    r"\bsessions?\b": "the authors' working sessions",
    r"DESIGN\.md": "a design file outside the repository",
    r"\bissue (?:notes|#?\d+)|\bthe issue\b": "the project's issue notes",
    r"\bGPU machines?\b": "a particular machine of the authors",
    r"/work/|\bshared/": "a path on the authors' machines",
    r"\b(?:still )?owed\b": "the authors' to-do list",
}


def blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, text)`` per block: lines between blank lines (a paragraph, a list, a table)."""
    out: list[tuple[int, str]] = []
    start, lines = 1, []
    for i, line in enumerate(path.read_text().splitlines() + [""], 1):
        if line.strip():
            start = start if lines else i
            lines.append(line)
        elif lines:
            out.append((start, "\n".join(lines)))
            lines = []
    return out


def measurements(text: str) -> list[str]:
    """The measured numbers in ``text``; a line that calls its numbers a setting or an assumption has none."""
    return [m.group(1) for line in text.splitlines() if not SETTING.search(line) for m in MEASUREMENT.finditer(line)]


def measurements_without_a_source(path: Path) -> list[str]:
    """A block's measurements are sourced when it, or the block just before it (a table's caption, a list's
    lead-in), names a results file: the file is named next to the number."""
    bad, previous = [], ""
    for line, text in blocks(path):
        found = measurements(text)
        if found and not RESULTS.search(text) and not (RESULTS.search(previous) and not text.startswith("#")):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {found[:4]} name no benchmarks/results/<file> next to them")
        previous = text if not text.startswith("#") else ""
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_measurement_names_its_results_file(doc):
    assert measurements_without_a_source(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_results_file_is_committed(doc):
    missing = sorted({name for name in RESULTS.findall(doc.read_text())
                      if not (ROOT / "benchmarks" / "results" / name).is_file()})
    assert missing == [], f"{doc.relative_to(ROOT)} names results files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_refers_to_what_a_user_cannot_reach(doc):
    hits = []
    for i, line in enumerate(doc.read_text().splitlines(), 1):
        for pattern, what in UNREACHABLE.items():
            if re.search(pattern, line, re.IGNORECASE):
                hits.append(f"{doc.relative_to(ROOT)}:{i}: refers to {what}: {line.strip()[:100]}")
    assert hits == []


def test_the_check_catches_what_it_should(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# A\n\nIt runs at 1.32x and 3.4 µs per launch.\n\n2 lanes, 4 nano-batches, TP=8, a 60 s timeout.\n\n"
                   "Measured (`benchmarks/results/x.json`):\n\n- 12 ms\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        bad = measurements_without_a_source(doc)
    finally:
        ROOT = root
    assert len(bad) == 1 and "d.md:3" in bad[0] and "1.32x" in bad[0] and "3.4 µs" in bad[0]
