"""The documentation's links into the code point at the lines they quote.

docs/*.md link code as [`SNIPPET`](../PATH#LN): line N of PATH must contain SNIPPET. When code moves, run
`python tests/test_docs.py` to rewrite each N to the line that now holds its snippet (it refuses a snippet that
is gone or ambiguous), then read the moved lines.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[`(?P<snippet>[^`]+)`\]\(\.\./(?P<path>[\w/.]+\.py)#L(?P<line>\d+)\)")


def links(doc: Path) -> list[re.Match]:
    return list(LINK.finditer(doc.read_text()))


def where(snippet: str, path: str) -> list[int]:
    """The 1-based lines of `path` that contain `snippet` (unescaping the table's \\|)."""
    text = snippet.replace("\\|", "|")
    return [i for i, line in enumerate((ROOT / path).read_text().splitlines(), 1) if text in line]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_links_quote_their_lines(doc):
    found = links(doc)
    if doc.name == "concepts.md":
        assert len(found) >= 40, "concepts.md links each step to its code"
    for m in found:
        lines = (ROOT / m["path"]).read_text().splitlines()
        n = int(m["line"])
        text = m["snippet"].replace("\\|", "|")
        assert n <= len(lines) and text in lines[n - 1], (
            f"{doc.name}: {m['path']}#L{n} does not hold {text!r} (now at lines {where(m['snippet'], m['path'])}); "
            f"run python tests/test_docs.py")


def relink(doc: Path) -> list[str]:
    """Rewrite each link's line number to its snippet's only line; the problems it could not fix."""
    problems = []

    def fix(m: re.Match) -> str:
        hits = where(m["snippet"], m["path"])
        if len(hits) != 1:
            problems.append(f"{doc.name}: {m['snippet']!r} is on lines {hits} of {m['path']}")
            return m[0]
        return f"[`{m['snippet']}`](../{m['path']}#L{hits[0]})"

    doc.write_text(LINK.sub(fix, doc.read_text()))
    return problems


if __name__ == "__main__":
    issues = [p for doc in DOCS for p in relink(doc)]
    print("\n".join(issues) or "links updated")
    sys.exit(1 if issues else 0)
