"""Shared fixtures: a small corpus and a prepared char-level data directory, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


OPENING = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
WORDS = ("the of and to in that is was he for it with as his on be at by I had not are but from or have an they which "
         "one you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great old year "
         "off come since against go came right used take three citizen king queen lord hello there speak hear").split()
SPEAKERS = ("First Citizen", "Second Citizen", "MENENIUS", "MARCIUS", "ROMEO", "JULIET", "KING HENRY", "QUEEN",
            "Hello", "All", "BRUTUS", "VOLUMNIA", "GLOUCESTER", "PETRUCHIO", "YORK", "Zounds", "Whither")


def corpus_text(n_chars: int = 60_000) -> str:
    """The head of tinyshakespeare (the standard test corpus beside the repo), or, where it is absent, a play-like
    text made from a fixed word list: every ASCII letter, digits and punctuation, and the same opening lines."""
    if TINY.is_file():
        return TINY.read_text(encoding="utf-8")[:n_chars]
    import random
    import string

    rng = random.Random(0)
    parts = [OPENING, string.ascii_letters + string.digits + " .,;:!?'-&[]\n\n"]
    while sum(map(len, parts)) < n_chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        line = " ".join(words).capitalize() + rng.choice(".,;!?:")
        parts.append(f"{rng.choice(SPEAKERS)}:\n{line}\n\n" if rng.random() < 0.3 else line + "\n")
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file) -> Path:
    from lmlab.data.tokens import prepare

    out = tmp_path_factory.mktemp("data")
    prepare([str(corpus_file)], out, tokenizer="char", quiet=True)
    return out


def lmlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", *args]


def subprocess_env(**extra: str) -> dict:
    """One thread per process: tests run subprocesses side by side on a 2-core machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="session")
def char_run(tmp_path_factory) -> Path:
    """A random-weight char model (context 256) saved as an lmlab checkpoint, for chat and export tests."""
    import torch

    from lmlab.checkpoint import save_model
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer.train([corpus_text(5_000) + "User: Assistant: System:"])
    cfg = ModelConfig(family="gpt2", vocab_size=tok.vocab_size, context_length=256, d_model=32, n_layers=1,
                      n_heads=2, bias=False)
    return save_model(tmp_path_factory.mktemp("char") / "ckpt", Transformer(cfg), tok)


def index_reachable() -> bool:
    """Whether pip could reach an index at all: PyPI over the network, or a local index pip is configured with.
    Tests that fetch from PyPI skip only when this is False, never on any other failure."""
    import urllib.request

    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    urls = [u for line in r.stdout.splitlines() if "index-url" in line
            for u in line.split("=", 1)[1].strip("'\"").split()]
    for url in urls + ["https://pypi.org/simple/"]:
        try:
            with urllib.request.urlopen(url, timeout=10):
                return True
        except (OSError, ValueError):
            continue
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def browser(width: int = 1000, height: int = 700):
    """Headless system Chromium under Selenium (the chat page's and the lab page's tests), or a skip where
    Debian's chromium and chromium-driver are not."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("needs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
