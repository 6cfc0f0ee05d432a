"""Key-map tables: how a foreign checkpoint's tensors become our parameters, and back again.

A table is a list of rows (our key, their keys, transform). "{i}" stands for a layer index, and
transform(cfg, *theirs) builds our tensor from theirs (a transpose, a concatenation, a row permutation).
Reading the same table backwards, with each transform's inverse, exports. weights/hf.py and weights/gguf.py
hold the tables; this module holds the one engine that walks them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from lmlab.config import ModelConfig

Row = tuple[str, tuple[str, ...], Callable[..., Any]]


class KeyMap:
    def __init__(self, rows: list[Row], inverses: dict[Callable[..., Any], Callable[..., list[Any]]]) -> None:
        self.rows = rows
        self.inverses = inverses
        self._rules = [(re.compile(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), theirs, fn)
                       for ours, theirs, fn in rows]

    def match(self, key: str) -> tuple[list[str], Callable[..., Any]] | None:
        """Their names for our `key`, and the transform; None when no row covers it."""
        for pattern, theirs, fn in self._rules:
            m = pattern.match(key)
            if m:
                return [t.format(i=m.group("i")) if "{i}" in t else t for t in theirs], fn
        return None

    def load(self, cfg: ModelConfig, our_keys: list[str], get: Callable[[str], Any | None],
             missing: Callable[[str], Exception]) -> Iterator[tuple[str, Any]]:
        """(our key, value) for each key, built from their tensors fetched with `get(name)` (None if absent).
        One key at a time, so a caller converting as it goes never holds two copies of the model."""
        for key in our_keys:
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied to wte: finish_load re-ties it
            found = self.match(key)
            if found is None:
                raise AssertionError(f"no key-map row for parameter {key!r}")  # a bug here, not the user's
            names, fn = found
            tensors = [get(n) for n in names]
            for name, t in zip(names, tensors, strict=True):
                if t is None:
                    raise missing(name)
            yield key, fn(cfg, *tensors)
            del tensors  # before the next reads: one parameter's source tensors alive at a time

    def export(self, cfg: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
        """Our state under their names: each row read backwards through its transform's inverse."""
        out: dict[str, Any] = {}
        for key, value in state.items():
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue
            found = self.match(key)
            if found is None:
                raise AssertionError(f"no key-map row for parameter {key!r}")
            names, fn = found
            out.update(zip(names, self.inverses[fn](cfg, value), strict=True))
        return out

    def names(self, n_layers: int) -> set[str]:
        """Every name of theirs the table can produce for a model of `n_layers` layers."""
        return {t.format(i=i) for _, theirs, _ in self.rows for t in theirs for i in range(n_layers)}
