"""Study reports for `lmlab lab`: every folder holding a report.md (`lmlab study` writes one, docs/studies holds the
committed ones), its Markdown rendered to HTML here, its images inlined as data: URIs so the page needs no route
(and no API key) to show them.

The Markdown is rendered by markdown-it-py (CommonMark with GFM's pipe tables), with raw HTML off: a report is
text, never markup. Two of its rules are ours: an image is inlined only when it is a file of the report's own
folder (a link out of it is not followed), and a link opens in a new tab and tells the other site nothing of the
page.
"""

from __future__ import annotations

import base64
import html
from functools import cache
from pathlib import Path
from urllib.parse import unquote

from lmlab.errors import LmlabError
from lmlab.training.runs import NOT_RUNS

REPORT = "report.md"
IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
MAX_DEPTH = 3


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
    """`markdown` as HTML (see the module's docstring); images come from `folder`."""
    return _markdown().render(markdown, {"folder": folder})


@cache
def _markdown():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(renderer, tokens, i, options, env) -> str:  # rules are bound to the renderer
        token = tokens[i]
        name = unquote(str(token.attrGet("src") or ""))  # markdown-it percent-encodes it
        return _image(html.escape(token.content, quote=True), name, env["folder"])

    def link_open(renderer, tokens, i, options, env) -> str:
        tokens[i].attrSet("target", "_blank")  # a new tab, with no Referer and no window.opener
        tokens[i].attrSet("rel", "noopener noreferrer")
        return renderer.renderToken(tokens, i, options, env)

    md.add_render_rule("image", image)
    md.add_render_rule("link_open", link_open)
    return md


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
