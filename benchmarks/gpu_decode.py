"""Every GPU decoding row of the GPU-decoding issue, lmlab against HF transformers, random bf16 weights, one run.

    python benchmarks/gpu_decode.py [--budget 480] [--rows ...] [--new-tokens 256] [--prompt-tokens 32]
    python benchmarks/gpu_decode.py --dry-run       # CPU, tiny shapes, no compile: checks every row's plumbing

Each row runs in its own subprocess with its own time limit (cut to what is left of --budget), a failing row
never stopping the rest; a short table is printed last. Rows, in order of value:
  tests        the CUDA-only tests (CUDA-graph decoding, torchao int4, the server's compiled step)
  lmlab-135m   SmolLM2-135M shape, the engine's CUDA-graph step, batch 1, 16 and 64 (aggregate tokens/s)
  hf-135m      HF transformers `generate`, greedy, EOS ignored: its dynamic cache, then cache_implementation=
               "static" with generate's own compile (compiling the forward by hand fails on transformers 5.17:
               "cudagraph output overwritten" in cache_utils' index_copy_), batch 1 and 16
  lmlab-8b     Llama-3.1-8B shape, batch 1: decode tokens/s and MBU (weight bytes per step x steps/s over a
               tensor copy's bandwidth measured in the same process); prefill tokens/s
  hf-8b        HF's prefill of the same prompt (one forward), for the prefill row
  lmlab-8b-int8, lmlab-8b-int4   the same through torchao's weight-only layers (`--quantize int8|int4`)
HF's decode tokens/s are (new - 1) tokens over a generation's time less that of a one-token generation.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROWS = ("tests", "lmlab-135m", "hf-135m", "lmlab-8b", "hf-8b", "lmlab-8b-int8", "lmlab-8b-int4")
LIMITS = {"tests": 150, "lmlab-135m": 150, "hf-135m": 150, "lmlab-8b": 120, "hf-8b": 60, "lmlab-8b-int8": 90,
          "lmlab-8b-int4": 90}


def device_and_shapes(dry: bool) -> tuple[str, str, str, str]:
    """(device, dtype, small preset, large preset): the issue's shapes on CUDA, tiny ones for a CPU dry run."""
    return ("cpu", "float32", "llama-cpu", "llama-cpu") if dry else ("cuda", "bfloat16", "smollm2-135m",
                                                                      "llama-3.1-8b")


def hf_model(preset: str, device: str, dtype: str):
    """A transformers LlamaForCausalLM of the preset's shape, random weights, built in its dtype on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.config import preset as preset_config
    from lmlab.utils import default_dtype, resolve_dtype

    c = preset_config(preset)
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      max_position_embeddings=c.context_length, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                      tie_word_embeddings=c.tie_embeddings)
    with torch.device(device), default_dtype(resolve_dtype(dtype)):
        return LlamaForCausalLM(cfg).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hf_seconds(model, batch: int, prompt: int, new: int, repeats: int, device: str, **kw) -> float:
    """Median seconds of one greedy generation of `new` tokens (EOS ignored) after one untimed warm-up."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)

    def once() -> float:
        sync(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        sync(device)
        return time.perf_counter() - t

    once()
    return statistics.median(once() for _ in range(repeats))


def hf_decode_rate(model, batch: int, args, device: str, **kw) -> float:
    full = hf_seconds(model, batch, args.prompt_tokens, args.new_tokens, args.repeats, device, **kw)
    first = hf_seconds(model, batch, args.prompt_tokens, 1, args.repeats, device, **kw)
    return batch * (args.new_tokens - 1) / (full - first)


def row_hf_small(args) -> None:
    device, dtype, small, _ = device_and_shapes(args.dry_run)
    model = hf_model(small, device, dtype)
    for b in (1, 16):
        print(f"HF {small} batch {b}, dynamic cache: {hf_decode_rate(model, b, args, device):,.0f} tokens/s",
              flush=True)
    if not args.dry_run:  # generate's own compile of the static-cache forward
        for b in (1, 16):
            rate = hf_decode_rate(model, b, args, device, cache_implementation="static")
            print(f"HF {small} batch {b}, static cache (generate's compile): {rate:,.0f} tokens/s", flush=True)


def row_hf_prefill(args) -> None:
    device, dtype, _, large = device_and_shapes(args.dry_run)
    model = hf_model(large, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), device=device)
    with torch.no_grad():
        model(ids)
        times = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            model(ids)
            sync(device)
            times.append(time.perf_counter() - t)
    print(f"HF {large} prefill of {args.prompt_tokens} tokens (one forward): "
          f"{args.prompt_tokens / statistics.median(times):,.0f} tokens/s", flush=True)


def row_lmlab(args, preset: str, batches: tuple[int, ...], quantize: str | None = None) -> None:
    from lmlab.bench import bench_generate

    device, dtype, _, _ = device_and_shapes(args.dry_run)
    for b in batches:
        r = bench_generate(preset=preset, batch=b, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                           runs=args.repeats, warmup=1, device=device, dtype=dtype, quantize=quantize,
                           group_size=32 if args.dry_run else 64, compile=None if args.dry_run else "default",
                           bandwidth_mib=256)
        for row in r["batches"][-1:] if b != 1 else r["batches"][:1]:
            print(f"lmlab {preset} {quantize or dtype} batch {row['batch']}: decode "
                  f"{row['decode_tokens_per_s']:,.0f} tokens/s, MBU {row['bandwidth_utilisation']:.0%} of "
                  f"{r['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, prefill {row['prefill_tokens_per_s']:,.0f} tokens/s"
                  + (f" (compile {r['compile_s']:.0f} s)" if r["compile_s"] else ""), flush=True)


def run_row(name: str, args) -> None:
    """One row, in this process (the parent gives each its own)."""
    _, _, small, large = device_and_shapes(args.dry_run)
    if name == "tests":
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or compiled",
                        "tests/test_fastpath.py", "tests/test_quant.py", "tests/test_engine.py"],
                       cwd=HERE.parent, check=False)
    elif name == "lmlab-135m":
        row_lmlab(args, small, (1, 16, 64))
    elif name == "hf-135m":
        row_hf_small(args)
    elif name == "lmlab-8b":
        row_lmlab(args, large, (1,))
    elif name == "hf-8b":
        row_hf_prefill(args)
    elif name.startswith("lmlab-8b-int"):
        row_lmlab(args, large, (1,), quantize=name.rsplit("-", 1)[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # a child process's one row
    ap.add_argument("--budget", type=float, default=480, help="seconds for every row together")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        args.new_tokens, args.prompt_tokens, args.repeats = 8, 8, 1
    if args.row is not None:
        torch.manual_seed(0)
        run_row(args.row, args)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py: no CUDA GPU here (--dry-run checks the script on CPU)")
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU dry run'}, torch "
          f"{torch.__version__}", flush=True)
    end, table = time.monotonic() + args.budget, []
    for name in args.rows.split(","):
        limit = max(0.0, min(LIMITS[name], end - time.monotonic()))
        cmd = [sys.executable, __file__, "--row", name, "--new-tokens", str(args.new_tokens), "--prompt-tokens",
               str(args.prompt_tokens), "--repeats", str(args.repeats)] + (["--dry-run"] if args.dry_run else [])
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=limit or 1)
            lines, rc = [ln for ln in p.stdout.splitlines() if ln.strip()], p.returncode
            if rc:
                lines.append((p.stderr.strip().splitlines() or ["(no output)"])[-1])
        except subprocess.TimeoutExpired as e:
            lines, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "").splitlines(), "timeout"
        print(f"[{name}] rc {rc} in {time.monotonic() - t:.0f} s", flush=True)
        table += [f"| {name} | {rc} | {line} |" for line in (lines[-8:] or ["-"])]
    print("\n| row | rc | result |\n|---|---|---|\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
