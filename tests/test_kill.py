"""Kill `lmlab train` with SIGKILL at random instants, resume each time, and demand the uninterrupted run's result
bit for bit: the way databases test crash safety.

LMLAB_TEST_SLOW_IO stretches the windows a kill can tear (inside each checkpoint swap and each metrics append),
so random instants land in them often. The default budget is a few kills; LMLAB_KILLS=50 runs the long version
(LMLAB_KILL_SEED picks another sequence of instants).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch

from lmlab.checkpoint import is_checkpoint, load_model, read_meta
from lmlab.training.metrics import read_events
from tests.conftest import lmlab_cmd, subprocess_env
from tests.test_train import FLAGS, weights

KILLS = int(os.environ.get("LMLAB_KILLS", "3"))
SEED = int(os.environ.get("LMLAB_KILL_SEED", "0"))
ENV = subprocess_env(LMLAB_TEST_SLOW_IO="0.03")


def launch(run: Path, args: list[str]) -> tuple[subprocess.Popen, float]:
    """Start training into `run` (resuming when it holds a checkpoint); return it and when it began writing."""
    resume = ["--resume"] if is_checkpoint(run / "last") else []
    metrics = run / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns if metrics.exists() else None
    proc = subprocess.Popen(lmlab_cmd("train", *args, "--out", str(run), *resume), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:  # past imports and set-up: metrics.jsonl is created or rewritten
        if metrics.exists() and metrics.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)
    return proc, time.time()


def windows_hit(run: Path) -> list[str]:
    """Which torn states a kill left behind (for the report; each must be harmless)."""
    names = {p.name for p in run.iterdir()}
    hit = [f"{d} swap between renames" for d in ("last", "best") if f".{d}.old" in names and d not in names]
    hit += [f"{d} swap, old copy not yet deleted" for d in ("last", "best") if f".{d}.old" in names and d in names]
    hit += ["checkpoint half-built" for n in names if n.endswith(".tmp") and (run / n).is_dir()]
    metrics = run / "metrics.jsonl"
    if metrics.exists() and metrics.read_bytes() and not metrics.read_bytes().endswith(b"\n"):
        hit.append("metrics line torn")
    return hit


def check_after_kill(run: Path, last_step: int) -> int:
    """A complete checkpoint, no older than the last one seen, readable by every reader; a readable log."""
    if last_step < 0 and not is_checkpoint(run / "last"):
        return last_step
    assert is_checkpoint(run / "last"), "a kill lost the last checkpoint"
    step = read_meta(run / "last")["run_state"]["step"]
    assert step >= last_step
    load_model(run / "last", torch.device("cpu"), torch.float32)
    if (run / "metrics.jsonl").exists():
        read_events(run / "metrics.jsonl")
    return step


def summary(events: list[dict]) -> list[tuple]:
    return [(e["event"], e["step"], e.get("loss"), e.get("val_loss"), e.get("reason")) for e in events]


def test_random_sigkills_resume_to_the_uninterrupted_run_bit_for_bit(tmp_path, char_data):
    args = [*FLAGS, "--data", str(char_data), "--max-steps", "16", "--eval-interval", "4", "--dropout", "0.1",
            "--log-interval", "1"]
    full = tmp_path / "full"
    proc, t0 = launch(full, args)
    assert proc.wait() == 0, proc.stderr.read()
    span = time.time() - t0  # how long a run writes: kills land uniformly within it
    reference, ref_events = weights(full / "last"), summary(read_events(full / "metrics.jsonl"))

    rng, kills, rounds, hits = random.Random(SEED), 0, 0, Counter()
    while kills < KILLS:
        run, last_step = tmp_path / f"killed{rounds}", -1
        while True:
            proc, _ = launch(run, args)
            try:
                rc = proc.wait(timeout=rng.uniform(0, span))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                kills += 1
                hits.update(windows_hit(run))
                last_step = check_after_kill(run, last_step)
                continue
            assert rc == 0, proc.stderr.read()
            break
        got = weights(run / "last")
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), run
        text = (run / "metrics.jsonl").read_text()
        assert text.endswith("\n") and summary(read_events(run / "metrics.jsonl")) == ref_events
        rounds += 1
    print(f"\n{kills} kills over {rounds} runs; torn states seen: {dict(hits)}")
