"""Peak memory of `lmlab prepare` against corpus size: it streams, so RSS must not grow with the corpus.

    python benchmarks/prepare_memory.py --mb 1024 --tokenizer char   # the issue's bar: 1 GB within 1.5 GB RSS

Writes a corpus of random words (a fixed 2,000-word list, seeded) of the given size to a temporary folder,
runs `python -m lmlab prepare` on it as a child process, and prints the child's peak RSS (from wait4's
rusage) and wall time. The corpus and the data directory are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_corpus(path: Path, mb: int, seed: int = 0) -> None:
    """`mb` MiB of lines of random words, one document."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(2000)]
    words = np.array(words + [w.capitalize() for w in words[:200]] + [",", ".", "!", "?", ";"])
    target = mb << 20
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            block = rng.choice(words, size=200_000)
            lines = [" ".join(block[i:i + 12]) for i in range(0, len(block), 12)]
            text = "\n".join(lines)[:target - written] + "\n"
            f.write(text)
            written += len(text)


def measure(corpus: Path, out: Path, tokenizer: str, vocab_size: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `lmlab prepare` child."""
    cmd = [sys.executable, "-m", "lmlab", "prepare", str(corpus), "--out", str(out), "--tokenizer", tokenizer,
           "--vocab-size", str(vocab_size), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"prepare failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, nargs="+", default=[1024], help="corpus sizes in MiB")
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    for mb in args.mb:
        tmp = Path(tempfile.mkdtemp(prefix="lmlab-prepare-mem-"))
        try:
            write_corpus(tmp / "corpus.txt", mb)
            rss, wall = measure(tmp / "corpus.txt", tmp / "data", args.tokenizer, args.vocab_size)
            print(f"{args.tokenizer} {mb} MiB corpus: peak RSS {rss:,.0f} MiB, wall {wall:.1f} s", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
