"""Every GPU training row of the issue, lmlab and nanoGPT back to back on one GPU, in about 8 minutes.

Usage (repo root, one CUDA GPU; nanoGPT's code comes from a checkout, never copied in; no network needed):
    python benchmarks/gpu_train.py --nanogpt PATH --corpus tinyshakespeare.txt [--budget 480] [--out DIR]
    python benchmarks/gpu_train.py --nanogpt PATH --corpus FILE --dry-run   # CPU, tiny: checks the script first

Rows, in order of value, each a subprocess with its own time limit (cut to what is left of --budget), a failing
row never stopping the rest; full logs in OUT/<row>.log, a short table printed last (OUT/table.md):
  tests        tests/test_fastpath.py on the GPU (the fast loss, fp8, compiled-vs-eager, the CUDA-graph step)
  step         benchmarks/gpu_train_step.py: GPT-2 124M steps of nanoGPT and lmlab (bench shape, preset, fp8)
               in one process: ms/step, MFU, compile, peak memory, the profiler's top kernels
  char-nanogpt nanoGPT's train.py config/train_shakespeare_char.py --max_iters=2000 (its best val near 1,750)
  char-*       lmlab recipes on the same model and batch (char-baby: 6L/6H/384, ctx 256, batch 64, dropout
               0.2), each stopped once its val loss reaches nanoGPT's best of this run
  bench-py     nanoGPT's own bench.py (--real_data=False), the figure earlier runs quoted
Times to a loss count from process start, compile included: every stdout line of both tools is stamped with the
seconds since its process was launched, and both print eval lines as "step N: train loss X, val loss Y".

The project's GPU machine has no torchao (`--fp8`), gguf, fastapi or network: carry torchao's wheel and install it
there first (`pip install --no-deps torchao-*.whl`); the rows that need what is missing fail alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
# lmlab's recipes for char-baby: (row, flags). The model, batch, dropout and data are nanoGPT's.
RECIPES = {
    "char-adamw": "--lr 1e-3 --min-lr 1e-4 --beta2 0.99 --warmup-steps 100 --max-steps 2000 --eval-interval 250 "
                  "--eval-batches 200",
    "char-muon": "--optimizer muon --lr 1e-2 --min-lr 1e-3 --warmup-steps 50 --max-steps 1000 --schedule wsd "
                 "--eval-interval 125 --eval-batches 50 --eval-batch-size 640 --eval-train false",
    "char-fp8": "--lr 1e-3 --min-lr 1e-4 --beta2 0.99 --warmup-steps 100 --max-steps 2000 --eval-interval 250 "
                "--eval-batches 200 --fp8",
}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def cut(self, limit: float) -> float:
        return max(0.0, min(limit, self.end - time.monotonic()))


def run_row(name: str, cmd: list[str], limit: float, out: Path, cwd: Path = ROOT,
            stop_when=None, env: dict | None = None) -> dict:
    """Run cmd with a time limit, stamping each output line with seconds since launch (to OUT/name.log). `stop_when`
    (a function of (seconds, line)) ends the process early when it returns True. Returns rc, wall, stamped lines."""
    log, lines, t0 = (out / f"{name}.log").open("w"), [], time.monotonic()
    print(f"[{name}] limit {limit:.0f} s: {' '.join(cmd)}", flush=True)
    if limit < 5:
        return dict(rc="skipped (no time left)", wall=0.0, lines=[])
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         env={**os.environ, **(env or {})})
    rc = None
    try:
        for line in p.stdout:
            t = time.monotonic() - t0
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:8.2f} {line}")
            if stop_when is not None and stop_when(t, line):
                p.terminate()
                rc = "stopped at target"
                break
            if t > limit:
                p.kill()
                rc = "timed out"
                break
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
    log.close()
    rc = rc or p.returncode
    print(f"[{name}] rc {rc} after {time.monotonic() - t0:.1f} s", flush=True)
    return dict(rc=rc, wall=time.monotonic() - t0, lines=lines)


def evals(lines: list[tuple[float, str]]) -> list[tuple[float, int, float]]:
    """(seconds since launch, step, val loss) of every eval line."""
    return [(t, int(m[1]), float(m[3])) for t, line in lines if (m := EVAL_LINE.search(line))]


def prepare(args, out: Path) -> tuple[Path, Path]:
    """nanoGPT's char data (its prepare.py on our corpus, copied in as its input.txt) and lmlab's."""
    nano = Path(args.nanogpt).resolve()
    shutil.copyfile(args.corpus, nano / "data" / "shakespeare_char" / "input.txt")
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=nano, check=True,
                   stdout=subprocess.DEVNULL)
    data = out / "char_data"
    if not (data / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "lmlab", "prepare", str(Path(args.corpus).resolve()), "--out",
                        str(data), "--tokenizer", "char", "--quiet"], cwd=ROOT, check=True)
    return nano, data


def char_commands(args, nano: Path, data: Path, out: Path) -> tuple[list[str], dict[str, list[str]]]:
    device = "cpu" if args.dry_run else "cuda"
    nano_cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--max_iters=2000",
                f"--out_dir={out.resolve() / 'nanogpt_char_out'}"]
    lm = [sys.executable, "-m", "lmlab", "train", "--data", str(data), "--preset", "char-baby", "--batch-size", "64",
          "--device", device, "--dtype", "bfloat16", "--compile"]
    if args.dry_run:  # a tiny model for a few steps: only the plumbing is checked
        tiny = ["--batch_size=4", "--block_size=64", "--n_layer=2", "--n_head=2", "--n_embd=64", "--max_iters=20",
                "--eval_interval=10", "--eval_iters=2", "--device=cpu", "--compile=False", "--dtype=float32"]
        nano_cmd += tiny
        lm = lm[:lm.index("--batch-size")] + ["--batch-size", "4", "--context-length", "64", "--n-layers", "2",
                                              "--n-heads", "2", "--d-model", "64", "--device", "cpu"]
    recipes = {}
    for name in args.recipes.split(","):
        flags = RECIPES[name].split()
        if args.dry_run:
            flags = [f for f in flags if f != "--fp8"] + ["--max-steps", "20", "--eval-interval", "10",
                                                          "--eval-batches", "2"]
        shutil.rmtree(out / f"lmlab_{name}", ignore_errors=True)  # a fresh run each time
        recipes[name] = lm + ["--out", str(out / f"lmlab_{name}")] + flags
    return nano_cmd, recipes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT")
    ap.add_argument("--corpus", required=True, help="tinyshakespeare as one text file")
    ap.add_argument("--budget", type=float, default=480, help="seconds for every row together")
    ap.add_argument("--recipes", default="char-muon,char-adamw,char-fp8", help=f"of {', '.join(RECIPES)}")
    ap.add_argument("--out", default="runs/bench/gpu_train")
    ap.add_argument("--dry-run", action="store_true", help="CPU and tiny shapes: checks every row's plumbing")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget, rows = Budget(args.budget), {}
    nano, data = prepare(args, out)
    dry = ["--dry-run"] if args.dry_run else []
    rows["tests"] = run_row("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "tests/test_fastpath.py"], budget.cut(120), out)
    rows["step"] = run_row("step", [sys.executable, "benchmarks/gpu_train_step.py", "--nanogpt", str(nano), "--out",
                                    str(out / "step"), *dry], budget.cut(200), out)
    nano_cmd, recipes = char_commands(args, nano, data, out)
    rows["char-nanogpt"] = run_row("char-nanogpt", nano_cmd, budget.cut(150), out, cwd=nano)
    nano_evals = evals(rows["char-nanogpt"]["lines"])
    target = min(v for _, _, v in nano_evals) if nano_evals else None
    for name, cmd in recipes.items():
        reached = (lambda t, line: (m := EVAL_LINE.search(line)) is not None and float(m[3]) <= target) \
            if target is not None else None
        rows[name] = run_row(name, cmd, budget.cut(110), out, stop_when=reached)
    bench_cmd = [sys.executable, "bench.py", "--real_data=False", "--batch_size=16", "--compile=True"]
    if args.dry_run:
        bench_cmd = [sys.executable, "-c", "print('bench.py needs CUDA (torch.cuda.synchronize): not dry-run')"]
    rows["bench-py"] = run_row("bench-py", bench_cmd, budget.cut(90), out, cwd=nano)
    print(table(rows, nano_evals, target, out))
    return 0


def table(rows: dict, nano_evals, target, out: Path) -> str:
    lines = ["| row | rc | wall s | result |", "|---|---|---|---|"]
    best = min(nano_evals, key=lambda e: e[2]) if nano_evals else None
    for name, r in rows.items():
        text = ""
        if name == "char-nanogpt" and best:
            text = f"best val {best[2]:.4f} at step {best[1]}, {best[0]:.1f} s from launch"
        elif name.startswith("char-"):
            ev = evals(r["lines"])
            hit = next((e for e in ev if target is not None and e[2] <= target), None)
            text = (f"val {hit[2]:.4f} <= {target:.4f} at step {hit[1]}, {hit[0]:.1f} s from launch"
                    + (f" = {hit[0] / best[0]:.2f}x nanoGPT's time" if best else "")) if hit else \
                (f"best val {min(e[2] for e in ev):.4f}, target not reached" if ev else "no eval line")
        elif name == "bench-py":
            text = next((ln for _, ln in reversed(r["lines"]) if "time per iteration" in ln), "")
        elif name == "tests":
            text = next((ln for _, ln in reversed(r["lines"]) if "passed" in ln or "failed" in ln), "")
        elif name == "step":
            text = f"see {out / 'step' / 'tables.md'}"
        lines.append(f"| {name} | {r['rc']} | {r['wall']:.0f} | {text} |")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    (out / "rows.json").write_text(json.dumps({k: {"rc": str(v["rc"]), "wall": v["wall"]} for k, v in rows.items()}))
    return text


if __name__ == "__main__":
    sys.exit(main())
