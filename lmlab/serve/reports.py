"""Study reports for `lmlab lab`: every folder holding a report.md (`lmlab study` writes one, docs/studies holds the
committed ones), its Markdown rendered to HTML here, its images inlined as data: URIs so the page needs no route
(and no API key) to show them.

The Markdown is the subset the reports are written in (lmlab/study/*.py's `report`): headings, paragraphs, pipe
tables, bullet lists, fenced code, images, links, `code` and **bold**. The text is HTML-escaped before anything
else: a report is text, never markup. An image is inlined only when it is a file of the report's own folder (a
link out of it is not followed); a link opens in a new tab and tells the other site nothing of the page.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.training.runs import NOT_RUNS

REPORT = "report.md"
IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
MAX_DEPTH = 3
LINK = r'<a href="\2" target="_blank" rel="noopener noreferrer">\1</a>'  # a new tab, no Referer, no window.opener


def source_tree_studies() -> Path | None:
    """docs/studies of the lmlab source tree this package runs from (an editable install or a checkout), if any."""
    folder = Path(__file__).resolve().parents[2] / "docs" / "studies"
    return folder if folder.is_dir() else None


def find_studies(roots: dict[str, Path]) -> dict[str, Path]:
    """{id: folder} of every report under the roots ({label: folder}), MAX_DEPTH levels down at most and never
    inside a run's checkpoints or logs (NOT_RUNS: best/, last/, tb/, ...); an id is LABEL/PATH-UNDER-THE-ROOT."""
    found = {}
    for label, root in roots.items():
        level = [root]
        for _ in range(MAX_DEPTH + 1):  # level by level, as the ids sort
            for folder in level:
                if (folder / REPORT).is_file():
                    where = folder.relative_to(root).as_posix()
                    found[label if where == "." else f"{label}/{where}"] = folder
            level = [child for folder in level for child in _subfolders(folder)]
    return found


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in NOT_RUNS
                      and not p.name.startswith("."))
    except OSError:  # unreadable: not ours to show
        return []


def render_report(folder: Path) -> str:
    """report.md of `folder` as HTML."""
    try:
        text = (folder / REPORT).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LmlabError(f"cannot read {folder / REPORT}: {e.strerror}") from None
    return render(text, folder)


def render(markdown: str, folder: Path) -> str:
    """The Markdown subset (see the module's docstring) as HTML; images come from `folder`."""
    lines, out, i = markdown.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
        elif line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")))
            out.append(f"<h{level}>{inline(line.lstrip('#').strip(), folder)}</h{level}>")
            i += 1
        else:
            kind = "table" if line.startswith("|") else "list" if line.startswith(("- ", "* ")) else "p"
            j = i + 1
            while j < len(lines) and lines[j].strip() and _kind(lines[j]) == kind:
                j += 1
            out.append(BLOCKS[kind](lines[i:j], folder))
            i = j
    return "\n".join(out)


def _kind(line: str) -> str:
    if line.startswith("|"):
        return "table"
    if line.startswith(("- ", "* ")):
        return "list"
    return "other" if line.startswith(("#", "```")) else "p"


def _table(lines: list[str], folder: Path) -> str:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]  # the |---| line
    if not rows:  # a table of nothing but |---| lines
        return ""
    head, body = rows[0], rows[1:]
    cells = lambda r, tag: "".join(f"<{tag}>{inline(c, folder)}</{tag}>" for c in r)  # noqa: E731
    return (f"<table><thead><tr>{cells(head, 'th')}</tr></thead><tbody>"
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in body) + "</tbody></table>")


BLOCKS = {
    "table": _table,
    "list": lambda lines, folder: "<ul>" + "".join(f"<li>{inline(ln[2:], folder)}</li>" for ln in lines) + "</ul>",
    "p": lambda lines, folder: f"<p>{inline(' '.join(ln.strip() for ln in lines), folder)}</p>",
}


def inline(text: str, folder: Path) -> str:
    """Escaped text with `code`, **bold**, images and links."""
    parts = re.split(r"(`[^`]*`)", text)  # code spans first: nothing inside them is markup
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part, quote=True)
        s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", lambda m: _image(m[1], html.unescape(m[2]), folder), s)
        s = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", LINK, s)
        out.append(re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s))
    return "".join(out)


def _image(alt: str, name: str, folder: Path) -> str:
    """<img> with the file inlined, when `name` is a picture in the report's own folder (not a link out of it, and
    readable); else the alt text."""
    path = folder / name
    kind = IMAGE_TYPES.get(path.suffix.lower())
    missing = f"<em>[image {html.escape(name)} not found beside the report]</em>"
    if kind is None or "/" in name or "\\" in name:
        return missing
    try:
        if not path.is_file() or path.resolve().parent != folder.resolve():
            return missing
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except (OSError, ValueError):  # unreadable; a name no file can have (a NUL)
        return missing
    return f'<img alt="{alt}" src="data:{kind};base64,{data}">'
