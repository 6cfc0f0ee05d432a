"""What a run directory says about itself, for a person watching runs (`lmlab lab`): settings, status, progress.

A run directory (lmlab/training/loop.py) holds best/ and last/ (their lmlab.json: the model and train settings and
the run state), metrics.jsonl (train, eval and stop events; the stop says why) and, while the loop runs,
running.json: the process id, its start time (as /proc counts it) and host of rank 0, written when the loop starts
and removed when it ends, however it ends short of a SIGKILL. A run's status follows from those alone:

    running   running.json names a live process on this host (the same pid and start time: a pid the system gave
              to another process since is not the run), or another host's (taken at its word)
    finished  the last event is the stop the loop writes after its last step ("finished N steps")
    stopped   any other stop, with its reason (interrupted, early stopping, a loss that diverged); or no stop
              record and no process left (a SIGKILL, a crash or a power cut: said so, with the last step logged)
    unknown   metrics.jsonl cannot be read or is damaged: the reason is that error

A page lists its runs every few seconds, and a log can hold 100k lines: `RunIndex` follows each run's log
(EventTail: only the lines appended since the last look are read) into a `Progress`, the little a description
needs, and re-reads an lmlab.json only when the file changed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.checkpoint import META, is_checkpoint, read_meta
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.training.metrics import EventTail
from lmlab.utils import atomic_write_text, current_dir

RUNNING = "running.json"
NOT_RUNS = {"best", "last", "tb", "data", "__pycache__"}  # folders inside a run (or a study) that hold no run
MAX_DEPTH = 4  # runs/study-NAME/RUN sits two levels down; deeper than this is not a run folder's layout

# The settings a person compares runs by, as (section, lmlab.json key, field names).
MODEL_FIELDS = ("family", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "context_length", "vocab_size")
OPTIMIZER_FIELDS = ("optimizer", "lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")
SCHEDULE_FIELDS = ("schedule", "warmup_steps", "max_steps", "max_tokens", "batch_size", "grad_accum",
                   "dropout_schedule", "seed")


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, what
    names one process, since the system hands a freed pid to the next process. None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        return int(text.rsplit(")", 1)[1].split()[19])  # after the command name, which may hold spaces: field 3 on
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def running_marker(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """RUN/running.json for as long as the block runs (`enabled`: on rank 0 only): how a reader tells a run that
    is training from one that a kill ended before it could log its stop."""
    if not enabled:
        yield
        return
    path = Path(run_dir) / RUNNING
    pid = os.getpid()
    atomic_write_text(path, json.dumps({"pid": pid, "start_ticks": start_ticks(pid), "host": socket.gethostname(),
                                        "started": time.time()}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def find_runs(root: Path) -> list[Path]:
    """The run directories under `root` (itself included), MAX_DEPTH levels down at most, sorted by path: those
    with a metrics.jsonl, a running.json, or a checkpoint in best/ or last/."""
    found = []

    def visit(folder: Path, depth: int) -> None:
        if any((folder / name).is_file() for name in ("metrics.jsonl", RUNNING)) or \
                is_checkpoint(folder / "last") or is_checkpoint(folder / "best"):
            found.append(folder)
        if depth < MAX_DEPTH:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:  # unreadable: not ours to list
                return
            for child in children:
                if child.name not in NOT_RUNS:
                    visit(child, depth + 1)

    visit(Path(root), 0)
    return found


def run_name(run_dir: Path, root: Path) -> str:
    """A run's name: its path under `root` ("." for the root itself)."""
    return Path(run_dir).relative_to(root).as_posix() or "."


def runs_by_name(root: Path) -> dict[str, Path]:
    """{name: folder} of the runs under `root`: a name from outside is looked up here, never joined to a path."""
    return {run_name(p, root): p for p in find_runs(root)}


@dataclass
class Progress:
    """What a run's events say about it, kept as they arrive rather than as the list of them: the last event, the
    highest step, the last train or eval event, and the best val loss."""

    last: dict | None = None
    step: int | None = None
    logged: dict | None = None
    best_val: float | None = None

    def add(self, events: list[dict]) -> Progress:
        for e in events:
            self.last = e
            if isinstance(e.get("step"), int) and not isinstance(e["step"], bool):
                self.step = e["step"] if self.step is None else max(self.step, e["step"])
            if e.get("event") in ("train", "eval"):
                self.logged = e
            val = e.get("val_loss")
            if e.get("event") == "eval" and isinstance(val, (int, float)) and not isinstance(val, bool):
                self.best_val = val if self.best_val is None else min(self.best_val, val)
        return self


def run_status(run_dir: Path, progress: Progress, error: str | None = None) -> dict[str, Any]:
    """{"state": running | finished | stopped | unknown, "reason": why, in words} (see the module's docstring);
    `error`: why the run's log could not be read."""
    marker, last = _marker(Path(run_dir)), progress.last
    if marker is not None and _alive(marker):
        since = f" (pid {marker.get('pid')} on {marker.get('host')})"
        return {"state": "running", "reason": f"training{since}"}
    if error is not None:
        return {"state": "unknown", "reason": error}
    if last is not None and last.get("event") == "stop":
        reason = str(last.get("reason", ""))
        return {"state": "finished" if reason.startswith("finished") else "stopped", "reason": reason}
    at = f" after step {progress.step}" if progress.step is not None else ""
    gone = f"process {marker.get('pid')} is gone" if marker is not None else "no process"
    return {"state": "stopped", "reason": f"no stop record{at} and {gone}: killed or crashed (--resume continues it)"}


def _marker(run_dir: Path) -> dict | None:
    try:
        marker = json.loads((run_dir / RUNNING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _alive(marker: dict) -> bool:
    """Whether the marker's process still runs: checked on this host (signal 0, and the same start time when the
    marker has one), believed on another."""
    if marker.get("host") != socket.gethostname():
        return True
    pid = marker.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    started, now = marker.get("start_ticks"), start_ticks(pid)
    return not (isinstance(started, int) and now is not None and now != started)


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The settings of a run, from the lmlab.json of its last/ (else best/) checkpoint: what it trains (kind, data),
    the model's shape and parameter count, optimizer, schedule, dropout per site, and its run state. {} before
    the first checkpoint."""
    where = next((d for d in (run_dir / "last", run_dir / "best") if is_checkpoint(d)), None)
    if where is None:
        return {}
    meta = read_meta(where)
    mc, tc = ModelConfig.from_dict(meta["config"]), meta.get("train_config") or {}
    return {"kind": _kind(meta), "data": meta.get("data_dir") or meta.get("data_file"),
            "model": {**{k: getattr(mc, k) for k in MODEL_FIELDS}, "params": mc.num_params()},
            "optimizer": {k: tc[k] for k in OPTIMIZER_FIELDS if k in tc},
            "schedule": {k: tc[k] for k in SCHEDULE_FIELDS if k in tc},
            "dropout": {"embed": mc.dropout_embed, "attn": mc.dropout_attn, "resid": mc.dropout_resid},
            "run_state": meta.get("run_state") or {}}


def _kind(meta: dict) -> str:
    if "adapter" in meta:
        a = meta["adapter"]
        return f"LoRA fine-tune of {a.get('base')} (r {a.get('r')}, alpha {a.get('alpha')})"
    if "finetune" in meta:
        return f"full fine-tune of {meta['finetune'].get('base')}"
    return "pretraining"


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of a file, None when absent: a file with the same key was not changed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class _Watched:
    """One run as RunIndex keeps it: its log followed into a Progress, its settings and when they were read."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.tail, self.progress = run_dir, EventTail(run_dir / "metrics.jsonl"), Progress()
        self.log_error: str | None = None
        self.log_key: tuple | None = None
        self.settings_key: tuple | None = None
        self.settings: dict[str, Any] = {}
        self.settings_error: str | None = None

    def refresh(self) -> None:
        key = _stat_key(self.tail.path)
        if self.log_error is None or key != self.log_key:  # a damaged log is read again only once it changes
            self.log_key = key
            try:
                new, restart = self.tail.read()
                self.log_error = None
            except LmlabError as e:
                self.log_error = str(e)
            else:
                if restart:
                    self.progress = Progress()
                self.progress.add(new)
        key = tuple(_stat_key(current_dir(self.run_dir / d) / META) for d in ("last", "best"))
        if key != self.settings_key:
            self.settings_key, self.settings, self.settings_error = key, {}, None
            try:
                self.settings = run_settings(self.run_dir)
            except LmlabError as e:
                self.settings_error = str(e)


class RunIndex:
    """The runs under `root`, each described as a list of runs shows it (`describe`), from what changed since
    the last call: its log's new lines, its lmlab.json when rewritten. Its status is worked out afresh each
    time, since a process can die without touching a file. Safe to call from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.watched: dict[Path, _Watched] = {}
        self.lock = threading.Lock()

    def describe(self) -> list[dict[str, Any]]:
        with self.lock:
            runs = find_runs(self.root)
            self.watched = {p: self.watched.get(p) or _Watched(p) for p in runs}  # runs gone are forgotten
            for w in self.watched.values():
                w.refresh()
            return [_description(w, self.root) for w in self.watched.values()]


def describe_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One run, read afresh (see `_description`)."""
    w = _Watched(Path(run_dir))
    w.refresh()
    return _description(w, Path(root))


def _description(w: _Watched, root: Path) -> dict[str, Any]:
    """A run for a list of runs: its name (path under `root`) and path, settings, status, best val loss, last
    step, tokens seen and training time. A damaged metrics.jsonl or lmlab.json is reported in "error", not raised."""
    state, logged = w.settings.get("run_state", {}), w.progress.logged
    field = lambda name: logged.get(name) if logged is not None else state.get(name)  # noqa: E731
    return {"name": run_name(w.run_dir, root), "path": str(w.run_dir), "error": w.log_error or w.settings_error,
            "settings": w.settings, "status": run_status(w.run_dir, w.progress, w.log_error),
            "best_val": w.progress.best_val, "step": field("step"), "tokens_seen": field("tokens_seen"),
            "elapsed_s": field("elapsed_s")}
