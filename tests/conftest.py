"""Shared fixtures: a small corpus and a prepared char-level data directory, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text(n_chars: int = 60_000) -> str:
    """The head of tinyshakespeare (the standard test corpus), or generated English-like text without it."""
    if TINY.is_file():
        return TINY.read_text(encoding="utf-8")[:n_chars]
    words = "the king and queen of england said that all is well that ends well in the night".split()
    out, i = [], 0
    while sum(map(len, out)) < n_chars:
        out.append(words[(i * 7 + i // 3) % len(words)] + ("\n" if i % 11 == 10 else " "))
        i += 1
    return "".join(out)[:n_chars]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file) -> Path:
    from lmlab.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare([str(corpus_file)], out, tokenizer="char", quiet=True)
    return out


def lmlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", *args]


def subprocess_env(**extra: str) -> dict:
    """One thread per process: tests run subprocesses side by side on a 2-core machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
