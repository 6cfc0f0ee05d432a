"""GPT-2 124M training steps of nanoGPT and lmlab side by side in one process: ms/step, tokens/s, MFU against the
bf16 matmul peak measured here, compile time, peak memory, and the top kernels of each under torch.profiler.

Usage (one CUDA GPU; nanoGPT's code is read from a checkout at run time, never copied in):
    python benchmarks/gpu_train_step.py --nanogpt PATH [--out DIR] [--variants ...]
    python benchmarks/gpu_train_step.py --nanogpt PATH --dry-run      # CPU, tiny shapes: checks the script itself

Variants (each a model + optimizer built once, compiled, then timed in rotating rounds so that neither gets the
warmer GPU):
    nanogpt           nanoGPT's model.py at bench.py's settings: no biases, vocabulary 50,304, fused AdamW
    lmlab-bench       lmlab on the same shape (bias false, vocab_size 50304: no padding needed), no clipping
    lmlab-bench-clip  the same with lmlab train's default clipping (grad norm 1.0): what clipping costs
    lmlab-preset      the gpt2-124m preset as `lmlab train` runs it: GPT-2's biases, 50,257 padded to 50,304, clip 1.0
    lmlab-bench-fp8   lmlab-bench with --fp8 (torchao float8 training, rowwise); skipped without FP8 hardware
Each step is forward (bf16 autocast), loss, backward, [clip], optimizer step, zero_grad, with no host sync inside
a timed block (nanoGPT's bench.py reads loss.item() every step; here neither side does). Peak memory is
max_memory_allocated during a variant's first steps, less what was allocated before it was built.

Prints markdown tables (speed and memory; per-variant top kernels; kernel time by kind) and writes them, with the
raw numbers as JSON, to --out (default runs/bench/gpu_train_step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmlab.bench import matmul_peak, sync, train_flops_per_token, train_stepper  # noqa: E402
from lmlab.config import ModelConfig, TrainConfig, preset  # noqa: E402

VARIANTS = ("nanogpt", "lmlab-bench", "lmlab-bench-clip", "lmlab-preset", "lmlab-bench-fp8")
KINDS = (  # kernel name fragments -> kind, first match wins (CUDA and CPU names)
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "sm80", "addmm", "aten::mm", "aten::bmm", "matmul",
              "scaled_mm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("fused by Inductor", ("triton", "cpp_fused", "kernel_cpp")),
    ("copy / cast", ("copy", "cast", "to_copy", "fill", "memset", "cat", "pad")),
)


def nanogpt_stepper(path: Path, shape: ModelConfig, batch, dev: torch.device, compile: bool):
    """nanoGPT's own model and optimizer at bench.py's settings, on `shape`'s dimensions."""
    sys.path.insert(0, str(path))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(1337)
    conf = GPTConfig(block_size=shape.context_length, vocab_size=shape.vocab_size, n_layer=shape.n_layers,
                     n_head=shape.n_heads, n_embd=shape.d_model, dropout=0.0, bias=False)
    model = GPT(conf).to(dev)
    opt = model.configure_optimizers(weight_decay=1e-2, learning_rate=1e-4, betas=(0.9, 0.95), device_type=dev.type)
    net = torch.compile(model) if compile else model
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step(i: int) -> torch.Tensor:
        x, y = batch(i)
        with ctx:
            _, loss = net(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def lmlab_stepper(variant: str, shape: ModelConfig, batch, dev: torch.device, compile: bool):
    cfg, train = shape, dict(grad_clip=0.0)
    if variant == "lmlab-bench-clip":
        train = dict(grad_clip=1.0)
    elif variant == "lmlab-preset":
        cfg = preset("gpt2-124m").replace(context_length=shape.context_length) if shape.d_model == 768 else \
            shape.replace(bias=True, vocab_size=shape.vocab_size - 47)
        train = dict(grad_clip=1.0)
    elif variant == "lmlab-bench-fp8":
        train = dict(grad_clip=0.0, fp8=True)
    tc = TrainConfig(dtype="bfloat16", compile=compile, **train)
    return train_stepper(cfg, tc, batch, dev, "default" if compile else None), cfg


def random_batches(vocab: int, B: int, T: int, dev: torch.device):
    x = torch.randint(vocab, (B, T), device=dev)  # fixed ids, as bench.py's --real_data=False
    y = torch.randint(vocab, (B, T), device=dev)
    return lambda i: (x, y)


def seconds(fn, dev: torch.device) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def build(variants: list[str], args, shape: ModelConfig, dev: torch.device) -> dict[str, dict]:
    """Each variant built in turn, its first step timed (compile included) and its peak memory read."""
    from lmlab.training.fastpath import fp8_refusal

    built = {}
    for name in variants:
        if name.endswith("fp8") and (why := fp8_refusal(dev)) is not None and not args.dry_run:
            print(f"{name}: skipped ({why})", flush=True)
            continue
        try:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            batch = random_batches(shape.vocab_size - (47 if name == "lmlab-preset" else 0), args.batch,
                                   args.context, dev)
            if name == "nanogpt":
                step, cfg = nanogpt_stepper(Path(args.nanogpt), shape, batch, dev, not args.no_compile), shape
            else:
                step, cfg = lmlab_stepper(name, shape, batch, dev, not args.no_compile)
            compile_s = seconds(lambda step=step: step(0), dev)
            for i in range(args.warmup):
                step(1 + i)
            sync(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else None
            built[name] = dict(step=step, cfg=cfg, compile_s=compile_s, peak_bytes=peak, times=[])
            print(f"{name}: built, first step {compile_s:.1f} s" + (f", peak {peak / 2**30:.2f} GiB" if peak else ""),
                  flush=True)
        except Exception as e:  # one failing variant must not stop the others
            print(f"{name}: FAILED to build: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    return built


def time_rounds(built: dict[str, dict], args, dev: torch.device) -> None:
    names = list(built)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            step = built[name]["step"]
            run = lambda step=step: [step(i) for i in range(args.steps)]  # noqa: E731
            built[name]["times"].append(seconds(run, dev) / args.steps)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile(step, dev: torch.device, steps: int = 3) -> list[tuple[str, float, int]]:
    """(kernel name, ms per step, calls per step) of the device's kernels (CPU ops in a dry run), by self time."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    step(0)
    sync(dev)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            step(i)
        sync(dev)
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        if dev.type == "cuda" and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if us > 0:
            rows.append((e.key, us / 1e3 / steps, e.count // steps))
    return sorted(rows, key=lambda r: -r[1])


def tables(built: dict[str, dict], profiles: dict[str, list], shape: ModelConfig, args, peak_flops) -> str:
    tokens = args.batch * args.context
    base = statistics.median(built["nanogpt"]["times"]) if "nanogpt" in built else None
    out = [f"batch {args.batch} x {args.context}, bf16 autocast, {'eager' if args.no_compile else 'compiled'}; "
           f"ms/step = median of {args.rounds} rotating rounds of {args.steps} steps",
           "", "| variant | params | ms/step | tokens/s | vs nanoGPT | MFU | first step (compile) | peak memory |",
           "|---|---|---|---|---|---|---|---|"]
    for name, b in built.items():
        ms = statistics.median(b["times"]) * 1e3
        tps = tokens / (ms / 1e3)
        mfu = train_flops_per_token(b["cfg"], args.context) * tps / peak_flops if peak_flops else None
        ratio = f"{base * 1e3 / ms:.2f}x" if base else "-"
        mem = f"{b['peak_bytes'] / 2**30:.2f} GiB" if b["peak_bytes"] else "-"
        out.append(f"| {name} | {b['cfg'].num_params():,} | {ms:.1f} | {tps:,.0f} | {ratio} | "
                   f"{f'{mfu:.1%}' if mfu else '-'} | {b['compile_s']:.1f} s | {mem} |")
    for name, rows in profiles.items():
        total = sum(ms for _, ms, _ in rows)
        out += ["", f"**{name}**: top kernels by time ({total:.1f} ms of kernels per step)", "",
                "| kernel | ms/step | % | calls/step |", "|---|---|---|---|"]
        out += [f"| `{k[:90]}` | {ms:.2f} | {ms / total:.1%} | {n} |" for k, ms, n in rows[:args.top]]
    if profiles:
        kinds = sorted({kind_of(k) for rows in profiles.values() for k, _, _ in rows})
        out += ["", "kernel time by kind, ms/step", "", "| kind | " + " | ".join(profiles) + " |",
                "|---|" + "---|" * len(profiles)]
        for kind in kinds:
            out.append(f"| {kind} | " + " | ".join(
                f"{sum(ms for k, ms, _ in rows if kind_of(k) == kind):.2f}" for rows in profiles.values()) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT (its model.py)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="runs/bench/gpu_train_step")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a 2-layer GPT of width 64: checks the script only")
    args = ap.parse_args()
    shape = ModelConfig(family="gpt2", vocab_size=50304, context_length=1024, d_model=768, n_layers=12, n_heads=12,
                        bias=False, dropout=0.0)
    dev = torch.device("cuda")
    if args.dry_run:
        dev, args.batch, args.context, args.steps, args.rounds, args.warmup = torch.device("cpu"), 2, 64, 2, 2, 1
        shape = shape.replace(d_model=64, n_layers=2, n_heads=2, vocab_size=512, context_length=64)
    torch.backends.cuda.matmul.allow_tf32 = True  # as bench.py (bf16 matmuls do not use it)
    print(f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU dry run'}, torch {torch.__version__}",
          flush=True)
    peak = matmul_peak(dev) if dev.type == "cuda" else None
    built = build([v for v in args.variants.split(",") if v], args, shape, dev)
    time_rounds(built, args, dev)
    profiles = {} if args.no_profile else {name: profile(b["step"], dev) for name, b in built.items()}
    text = tables(built, profiles, shape, args, peak)
    if peak:
        text = f"bf16 matmul peak measured here: {peak / 1e12:,.0f} TFLOP/s (8192^3)\n\n" + text
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text + "\n")
    raw = {n: {k: v for k, v in b.items() if k in ("compile_s", "peak_bytes", "times")} for n, b in built.items()}
    (out / "raw.json").write_text(json.dumps(dict(raw, matmul_peak=peak, torch=torch.__version__), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
