"""A run's event log: metrics.jsonl (one JSON object per line, rank 0 only) and, when tensorboard is installed,
TensorBoard scalars.

Lines are only ever appended, so a kill can tear the last line and no other: readers drop a torn last line
(`read_events`; `EventTail`, which follows a run while it writes, waits for its end), and a resumed run rewrites
the file without it and without the events it will redo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.utils import atomic_write_text, slow_io


def read_events(path: Path) -> list[dict]:
    """Every event in a metrics.jsonl file; a torn last line (a kill mid-append, or a run writing it right now)
    is dropped, a damaged line elsewhere is an error."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LmlabError(f"cannot read {path}: {e.strerror}") from None
    return parse_events(text, path)[0]


def parse_events(text: str, path: Path, first_line: int = 1, whole: bool = True) -> tuple[list[dict], int]:
    """The events in `text` (lines of metrics.jsonl from line `first_line` on) and how many characters were read.

    The piece after the last newline is a line not finished yet: an append in progress, or one a kill tore.
    Reading a whole file (`whole`), it counts if it is an event and is dropped if not; following a file that is
    being written (EventTail), it is left for the next read. A damaged line before it is an error."""
    lines = text.split("\n")
    last = lines.pop()  # "" when the text ends with a newline
    events = []
    for i, line in enumerate(lines, first_line):
        if line.strip():
            event = _event(line)
            if event is None:
                raise LmlabError(f"{path} line {i} is not a JSON event; the file is damaged")
            events.append(event)
    if whole and _event(last) is not None:
        events.append(_event(last))
        return events, len(text)
    return events, len(text) - len(last)


def _event(line: str) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class EventTail:
    """Follows a metrics.jsonl while its run appends to it: each `read()` gives the events of the lines finished
    since the previous one (a line still being written waits for its newline, as read_events drops a torn one).
    A file replaced since (a resumed run rewrites its log, a new run starts one) is read again from its start.
    Replaced is told by its inode, a size below what was read, or a first line that is not the one read before:
    a new run's log, created right after the old one was removed, often gets the old inode back and may have
    grown past the old size by the next look, but its first event (with its elapsed time) is not the old one's."""

    HEAD = 4096  # bytes of the first line kept to compare

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.line, self.inode, self.head = path, 0, 1, None, b""

    def read(self) -> tuple[list[dict], bool]:
        """(the new events, whether the file started over: the events read before are void)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                restart = self.offset > 0 and (st.st_ino != self.inode or st.st_size < self.offset or
                                               f.read(len(self.head)) != self.head)
                if restart:
                    self.offset, self.line, self.head = 0, 1, b""
                self.inode = st.st_ino
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # not written yet (or between a rewrite's unlink and its first line)
            return [], False
        except OSError as e:
            raise LmlabError(f"cannot read {self.path}: {e.strerror}") from None
        done = data[:data.rfind(b"\n") + 1]  # whole lines only: no UTF-8 character is cut either
        text = done.decode("utf-8", errors="replace")
        events, _ = parse_events(text, self.path, self.line, whole=False)
        if self.offset == 0:
            self.head = done[:done.find(b"\n") + 1][:self.HEAD]
        self.offset += len(done)
        self.line += text.count("\n")
        return events, restart


class Metrics:
    """Appends events to RUN/metrics.jsonl and TensorBoard. `resume_step` None starts a new log; otherwise the
    log keeps the events up to that step (the ones a resumed run will not redo), minus any "stop"."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [e for e in read_events(self.path) if e.get("step", 0) <= resume_step and e["event"] != "stop"]
            atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except Exception:  # tensorboard not installed: the JSONL file is the record
            self.tb = None

    def log(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, **fields}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            half = len(line) // 2
            f.write(line[:half])
            f.flush()
            slow_io()  # no-op outside tests/test_kill.py, which kills here to tear a line
            f.write(line[half:])
        if self.tb is not None and "step" in fields:
            for k, v in fields.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, fields["step"])

    def events(self) -> list[dict]:
        return read_events(self.path) if self.enabled and self.path.exists() else []

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
