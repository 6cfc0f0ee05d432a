"""What a run directory says about itself, for a person watching runs (`lmlab lab`): settings, status, progress.

A run directory (lmlab/training/loop.py) holds best/ and last/ (their lmlab.json: the model and train settings and
the run state), metrics.jsonl (train, eval and stop events; the stop says why) and, while the loop runs,
running.json: the process id and host of rank 0, written when the loop starts and removed when it ends, however it
ends short of a SIGKILL. A run's status follows from those alone:

    running   running.json names a live process on this host (another host's is taken at its word)
    finished  the last event is the stop the loop writes after its last step ("finished N steps")
    stopped   any other stop, with its reason (interrupted, early stopping, a loss that diverged); or no stop
              record and no process left (a SIGKILL, a crash or a power cut: said so, with the last step logged)
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmlab.checkpoint import is_checkpoint, read_meta
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.training.metrics import read_events
from lmlab.utils import atomic_write_text

RUNNING = "running.json"
NOT_RUNS = {"best", "last", "tb", "data", "__pycache__"}  # folders inside a run (or a study) that hold no run
MAX_DEPTH = 4  # runs/study-NAME/RUN sits two levels down; deeper than this is not a run folder's layout

# The settings a person compares runs by, as (section, lmlab.json key, field names).
MODEL_FIELDS = ("family", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "context_length", "vocab_size")
OPTIMIZER_FIELDS = ("optimizer", "lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")
SCHEDULE_FIELDS = ("schedule", "warmup_steps", "max_steps", "max_tokens", "batch_size", "grad_accum",
                   "dropout_schedule", "seed")


@contextmanager
def running_marker(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """RUN/running.json for as long as the block runs (`enabled`: on rank 0 only): how a reader tells a run that
    is training from one that a kill ended before it could log its stop."""
    if not enabled:
        yield
        return
    path = Path(run_dir) / RUNNING
    atomic_write_text(path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
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


def run_status(run_dir: Path, events: list[dict]) -> dict[str, Any]:
    """{"state": running | finished | stopped, "reason": why, in words} (see the module's docstring)."""
    marker, last = _marker(Path(run_dir)), events[-1] if events else None
    if marker is not None and _alive(marker):
        since = f" (pid {marker.get('pid')} on {marker.get('host')})"
        return {"state": "running", "reason": f"training{since}"}
    if last is not None and last.get("event") == "stop":
        reason = str(last.get("reason", ""))
        return {"state": "finished" if reason.startswith("finished") else "stopped", "reason": reason}
    steps = [e["step"] for e in events if isinstance(e.get("step"), int)]
    at = f" after step {max(steps)}" if steps else ""
    gone = f"process {marker.get('pid')} is gone" if marker is not None else "no process"
    return {"state": "stopped", "reason": f"no stop record{at} and {gone}: killed or crashed (--resume continues it)"}


def _marker(run_dir: Path) -> dict | None:
    try:
        marker = json.loads((run_dir / RUNNING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _alive(marker: dict) -> bool:
    """Whether the marker's process still runs: checked on this host (signal 0), believed on another."""
    if marker.get("host") != socket.gethostname():
        return True
    pid = marker.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


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


def describe_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One run for a list of runs: its name (path under `root`) and path, settings, status, best val loss, last
    step, tokens seen and training time. A damaged metrics.jsonl or lmlab.json is reported in "error", not raised."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"name": run_dir.relative_to(root).as_posix() or ".", "path": str(run_dir), "error": None,
                           "settings": {}}
    events: list[dict] = []
    try:
        if (run_dir / "metrics.jsonl").is_file():
            events = read_events(run_dir / "metrics.jsonl")
        out["settings"] = run_settings(run_dir)
    except LmlabError as e:
        out["error"] = str(e)
    evals = [e for e in events if e.get("event") == "eval" and isinstance(e.get("val_loss"), (int, float))]
    logged = [e for e in events if e.get("event") in ("train", "eval")]
    state = out["settings"].get("run_state", {})
    out["status"] = run_status(run_dir, events)
    out["best_val"] = min((e["val_loss"] for e in evals), default=None)
    out["step"] = logged[-1].get("step") if logged else state.get("step")
    out["tokens_seen"] = logged[-1].get("tokens_seen") if logged else state.get("tokens_seen")
    out["elapsed_s"] = logged[-1].get("elapsed_s") if logged else state.get("elapsed_s")
    return out
