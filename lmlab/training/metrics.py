"""A run's event log: metrics.jsonl (one JSON object per line, rank 0 only) and, when tensorboard is installed,
TensorBoard scalars.

Lines are only ever appended, so a kill can tear the last line and no other: readers drop a torn last line
(`read_events`), and a resumed run rewrites the file without it and without the events it will redo.
"""

from __future__ import annotations

import json
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
    lines = text.split("\n")  # a complete file ends with "\n": the last piece is "" or the torn line
    events = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            if i == len(lines):  # no newline after it: the append never finished
                break
            raise LmlabError(f"{path} line {i} is not a JSON event; the file is damaged") from None
        events.append(event)
    return events


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
