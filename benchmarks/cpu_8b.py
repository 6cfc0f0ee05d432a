"""The founding documents' model on a CPU, side by side with llama.cpp: Llama-3.1-8B's shape as a Q4 GGUF (the
synthetic file of benchmarks/synthetic_gguf.py: random quantized blocks in llama.cpp's layout, SmolLM2's real
tokenizer and chat template), load time and peak RSS, prefill and decode tokens/s, and a one-line chat.

    python benchmarks/cpu_8b.py [--gguf /tmp/llama8b-q4_0.gguf] [--threads 2] [--new-tokens 32] [--repeats 3]

Loads run in fresh processes, alternating lmlab and llama.cpp (llama-cpp-python), so each peak RSS (VmHWM) is its
own: lmlab's first load (the packed-form cache emptied: it packs the file and writes the cache) once, then its
second loads (the cache read back, memory-mapped) against llama.cpp's (the file memory-mapped), each after the
file is in the page cache. Prefill (a 32-token prompt) and decode run in one process holding both models,
alternating run by run after a warm-up, medians reported; lmlab greedy through its engine, llama.cpp through its
generator (temp 0), EOS ignored. The chat row renders one user message with the file's chat template and times
the first token and the tokens/s of the reply, the same prompt ids for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
t = time.perf_counter()
if sys.argv[1] == "lmlab":
    from lmlab.weights.gguf import load_gguf
    load_gguf(sys.argv[2])
else:
    from llama_cpp import Llama
    Llama(model_path=sys.argv[2], n_ctx=512, n_threads=int(sys.argv[3]), verbose=False)
print(json.dumps({"load_s": time.perf_counter() - t, "peak_rss": hwm()}))
"""


def load_row(tool: str, gguf: Path, threads: int, env: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", LOAD, tool, str(gguf), str(threads)], capture_output=True, text=True,
                       env=env, cwd=HERE.parent, timeout=1800)
    if p.returncode:
        raise SystemExit(f"{tool} load failed: {p.stderr.strip().splitlines()[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def split(stamps: list[float], start: float, n_prompt: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): the prompt over the time to the first new token, later tokens over
    the time they took."""
    return n_prompt / (stamps[0] - start), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def engines(gguf: Path, threads: int, n: int):
    import torch
    from llama_cpp import Llama

    import lmlab
    from lmlab.infer.engine import forget_prompt
    from lmlab.infer.generate import SamplingConfig, generate_ids

    torch.set_num_threads(threads)
    lm = lmlab.load(gguf, device="cpu")
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    s = SamplingConfig(max_new_tokens=n, temperature=0)

    def ours(ids):
        forget_prompt(lm.model)  # a cold prefill, as llama.cpp's after its reset
        start, stamps = time.perf_counter(), []
        for _ in generate_ids(lm.model, [ids], s, eos_id=None):
            stamps.append(time.perf_counter())
        return start, stamps

    def theirs(ids):
        llm.reset()
        start, stamps = time.perf_counter(), []
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return start, stamps

    return lm, {"lmlab": ours, "llama.cpp": theirs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="/tmp/llama8b-q4_0.gguf")
    ap.add_argument("--qtype", default="Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gguf = Path(args.gguf)
    if not gguf.exists():
        subprocess.run([sys.executable, str(HERE / "synthetic_gguf.py"), "--preset", "llama-3.1-8b", "--qtype",
                        args.qtype, "--out", str(gguf)], check=True)
    cache = Path(tempfile.mkdtemp(prefix="lmlab-cpu8b-"))
    env = {**os.environ, "LMLAB_CACHE": str(cache)}
    rows = {"lmlab first load": [load_row("lmlab", gguf, args.threads, env)]}  # packs, writes the cache
    for _ in range(args.repeats):
        for tool, name in (("llama.cpp", "llama.cpp load"), ("lmlab", "lmlab load (cached)")):
            rows.setdefault(name, []).append(load_row(tool, gguf, args.threads, env))
    for name, rs in rows.items():
        times = [r["load_s"] for r in rs]
        print(f"{name}: {statistics.median(times):.1f} s ({', '.join(f'{t:.1f}' for t in times)}), "
              f"peak RSS {max(r['peak_rss'] for r in rs) / 2**30:.2f} GiB", flush=True)
    os.environ["LMLAB_CACHE"] = str(cache)
    speed(gguf, args)
    shutil.rmtree(cache, ignore_errors=True)
    return 0


def speed(gguf: Path, args) -> None:
    from lmlab.templates import chat_prompt_ids

    lm, run = engines(gguf, args.threads, args.new_tokens)
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:32]
    chat = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": "Say hello in one line."}])
    for ids, what in ((prompt, "32-token prompt"), (chat, f"chat, {len(chat)}-token prompt")):
        got = {name: [] for name in run}
        for name in run:
            run[name](ids)  # warm-up
        for _ in range(args.repeats):
            for name, fn in run.items():
                start, stamps = fn(ids)
                got[name].append((stamps[0] - start, *split(stamps, start, len(ids))))
        for name, rs in got.items():
            ttft, pre, dec = (statistics.median(r[i] for r in rs) for i in range(3))
            print(f"{what}, {name}: prefill {pre:.1f} tokens/s, decode {dec:.2f} tokens/s, first token "
                  f"{ttft:.2f} s (decode runs {', '.join(f'{r[2]:.2f}' for r in rs)})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
