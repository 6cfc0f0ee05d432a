"""The char-cpu acceptance run against nanoGPT's README CPU recipe, on this machine, in one run, alternating.

    python benchmarks/train_vs_nanogpt.py --nanogpt /path/to/nanoGPT [--repeats 2] [--threads N]
                                          [--recipes nanogpt,muon]

nanoGPT is not on PyPI, so this takes the path of a checkout of its public repository
(https://github.com/karpathy/nanoGPT), kept outside this repo; nothing of it is copied into lmlab. The checkout is
copied to a scratch folder under --work (its train.py reads configurator.py and data/ from the working directory),
its data/shakespeare_char/prepare.py is run there on our tinyshakespeare file (never downloading), and then:

    nanoGPT  python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
             --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
             --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0          (its README's CPU recipe)
    lmlab    RECIPE=nanogpt bash benchmarks/char_cpu.sh SEED                 (the same model, optimizer and steps)
    lmlab    RECIPE=muon bash benchmarks/char_cpu.sh SEED                    (the same model and batch; Muon, 600 steps)

The run's goal is nanoGPT's: val loss <= 1.89. Each repeat runs every tool, in rotating order, so machine noise
hits them alike. Wall time is each whole training
process (interpreter start, imports, evaluations and checkpoints included); val loss is the final evaluation each
tool prints, and lmlab's loss on all of val (`lmlab eval`) is reported too. --threads sets OMP_NUM_THREADS for both
tools alike; without it each runs with its own default. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
# nanoGPT's prepare.py imports requests only to download a file we provide: run it with a stand-in module.
RUN_PREPARE = ("import runpy, sys, types; sys.modules.setdefault('requests', types.ModuleType('requests')); "
               "runpy.run_path('prepare.py', run_name='__main__')")


def machine() -> dict:
    """The CPU (model, cores, the vector flags that decide CPU kernels: lmlab.bench.machine), torch, and the
    load when we start."""
    import torch

    from lmlab.bench import machine as cpu

    return {"cpu": cpu(torch.device("cpu")), "torch": torch.__version__,
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def setup_nanogpt(checkout: Path, corpus: Path, work: Path, python: str) -> Path:
    """A scratch copy of the checkout with its shakespeare_char data prepared from `corpus`."""
    if not (checkout / "train.py").is_file() or not (checkout / "config/train_shakespeare_char.py").is_file():
        sys.exit(f"train_vs_nanogpt: {checkout} is not a nanoGPT checkout (no train.py / config)")
    dst = work / "nanogpt"
    if not (dst / "data/shakespeare_char/val.bin").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(checkout, dst, ignore=shutil.ignore_patterns(".git", "out*"))
        shutil.copy(corpus, dst / "data/shakespeare_char/input.txt")
        subprocess.run([python, "-c", RUN_PREPARE], cwd=dst / "data/shakespeare_char", check=True,
                       stdout=subprocess.DEVNULL)
    return dst


def run_nanogpt(dst: Path, python: str, env: dict) -> dict:
    shutil.rmtree(dst / "out-shakespeare-char", ignore_errors=True)
    t = time.perf_counter()
    out = subprocess.run([python, "train.py", *NANOGPT_ARGS], cwd=dst, env=env, check=True, text=True,
                         capture_output=True).stdout
    wall = time.perf_counter() - t
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)
    return {"tool": "nanoGPT", "wall_s": round(wall, 1), "val_loss": float(evals[-1][2]), "step": int(evals[-1][0])}


def run_lmlab(recipe: str, seed: int, corpus: Path, env: dict) -> dict:
    out = subprocess.run(["bash", "benchmarks/char_cpu.sh", str(seed)], cwd=REPO,
                         env={**env, "CORPUS": str(corpus), "RECIPE": recipe},
                         check=True, text=True, capture_output=True).stdout
    m = re.search(r"val loss ([\d.]+) \(fixed .*?\), ([\d.]+) \(all of val\), wall ([\d.]+) s", out)
    if m is None:
        sys.exit(f"train_vs_nanogpt: unexpected output from char_cpu.sh:\n{out}")
    return {"tool": f"lmlab {recipe}", "wall_s": float(m.group(3)), "val_loss": float(m.group(1)),
            "full_val_loss": float(m.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="a checkout of nanoGPT, outside this repo")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337, help="lmlab's seed (nanoGPT's is fixed at 1337)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both; 0: each tool's default")
    ap.add_argument("--recipes", default="nanogpt,muon", help="char_cpu.sh recipes to run (nanogpt, muon)")
    ap.add_argument("--corpus", type=Path, default=Path(os.environ.get("CORPUS", REPO.parent / "shared/data/"
                                                                        "tinyshakespeare.txt")))
    ap.add_argument("--work", type=Path, default=REPO / "runs/bench/vs_nanogpt")
    ap.add_argument("--out", type=Path, default=REPO / "runs/bench/train_vs_nanogpt.json")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"train_vs_nanogpt: corpus {args.corpus} not found; pass --corpus tinyshakespeare.txt")
    python = sys.executable
    env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    dst = setup_nanogpt(args.nanogpt.resolve(), args.corpus.resolve(), args.work.resolve(), python)
    info = machine()
    print(f"machine: {info['cpu']}; torch {info['torch']}; "
          f"load {info['load_avg_1min']}; threads {args.threads or 'default'}", flush=True)
    tools = ["nanoGPT"] + [f"lmlab {r}" for r in args.recipes.split(",")]
    rows = []
    for r in range(args.repeats):
        for tool in tools[r % len(tools):] + tools[:r % len(tools)]:  # rotate who goes first
            row = (run_nanogpt(dst, python, env) if tool == "nanoGPT"
                   else run_lmlab(tool.split()[1], args.seed, args.corpus, env))
            row["repeat"] = r
            rows.append(row)
            print(json.dumps(row), flush=True)
    med = {t: statistics.median(x["wall_s"] for x in rows if x["tool"] == t) for t in tools}
    result = {"machine": info, "threads": args.threads or None, "runs": rows, "median_wall_s": med,
              "speedup_of_medians": {t: round(med["nanoGPT"] / med[t], 3) for t in tools[1:]},
              "speedup_per_repeat": {t: [round(n["wall_s"] / o["wall_s"], 3) for n, o in zip(
                  (x for x in rows if x["tool"] == "nanoGPT"), (x for x in rows if x["tool"] == t), strict=True)]
                  for t in tools[1:]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for t in tools[1:]:
        print(f"median wall: nanoGPT {med['nanoGPT']:.1f} s, {t} {med[t]:.1f} s: "
              f"{result['speedup_of_medians'][t]:.2f}x nanoGPT's speed (per repeat: {result['speedup_per_repeat'][t]})")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
