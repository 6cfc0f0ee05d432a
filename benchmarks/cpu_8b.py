"""The founding documents' model on a CPU, side by side with llama.cpp: Llama-3.1-8B's shape as a Q4 GGUF (the
synthetic file of benchmarks/synthetic_gguf.py: random quantized blocks in llama.cpp's layout, SmolLM2's real
tokenizer and chat template), load time and peak RSS, prefill and decode tokens/s, and a one-line chat.

    python benchmarks/cpu_8b.py [--gguf /tmp/llama8b-q4_0.gguf] [--threads 2] [--new-tokens 32] [--repeats 3]
                                [--compile]

Loads run in fresh processes, alternating lmlab and llama.cpp (llama-cpp-python), so each peak RSS (VmHWM) is its
own: lmlab's first load (the packed-form cache emptied: it packs the file and writes the cache) once, then its
second loads (the cache read back, memory-mapped) against llama.cpp's (the file memory-mapped), each after the
file is in the page cache. Both map their weights, so a load alone touches few pages: the peak RSS is read again
after 8 greedy tokens, when every weight has been read once. Prefill and decode run in one process holding both
models, alternating run by run after a warm-up, medians reported (and each run's decode figure); lmlab greedy
through its engine, llama.cpp through its generator (temp 0), EOS ignored; prompts of 32 and 128 tokens, and a
chat row: one user message rendered with the file's chat template, the same prompt ids for both. `--compile` adds
lmlab with its decoding step compiled (lmlab.load(compile=True)), the compile time printed apart.
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
    import lmlab
    from lmlab.infer.generate import SamplingConfig
    lm = lmlab.load(sys.argv[2], device="cpu")
    load_s, loaded = time.perf_counter() - t, hwm()
    lm.generate("Hello", SamplingConfig(max_new_tokens=8, temperature=0))
else:
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[2], n_ctx=512, n_threads=int(sys.argv[3]), verbose=False)
    load_s, loaded = time.perf_counter() - t, hwm()
    llm("Hello", max_tokens=8, temperature=0.0)
print(json.dumps({"load_s": load_s, "peak_rss": loaded, "peak_rss_8_tokens": hwm()}))
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


def engines(gguf: Path, threads: int, n: int, compile: bool):
    import torch
    from llama_cpp import Llama

    import lmlab
    from lmlab.infer.engine import forget_prompt
    from lmlab.infer.generate import SamplingConfig, generate_ids

    sys.path.insert(0, str(HERE))
    from decode_smollm2 import llamacpp_stamps

    torch.set_num_threads(threads)
    lm = lmlab.load(gguf, device="cpu")
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    s = SamplingConfig(max_new_tokens=n, temperature=0)

    def ours(model):
        def run(ids):
            forget_prompt(model)  # a cold prefill, as llama.cpp's after its reset
            start, stamps = time.perf_counter(), []
            for _ in generate_ids(model, [ids], s, eos_id=None):
                stamps.append(time.perf_counter())
            return start, stamps
        return run

    def theirs(ids):
        return llamacpp_stamps(llm, ids, n)

    run = {"lmlab": ours(lm.model), "llama.cpp": theirs}
    if compile:
        t = time.perf_counter()
        compiled = lmlab.load(gguf, device="cpu", compile=True).model  # the cache's mapped pages, shared
        ours(compiled)(lm.tokenizer.encode("Hello"))
        print(f"lmlab --compile: first generation (compiling the decoding step) {time.perf_counter() - t:.0f} s",
              flush=True)
        run["lmlab --compile"] = ours(compiled)
    return lm, run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="/tmp/llama8b-q4_0.gguf")
    ap.add_argument("--qtype", default="Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time lmlab with its decoding step compiled")
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
              f"peak RSS {max(r['peak_rss'] for r in rs) / 2**30:.2f} GiB after the load, "
              f"{max(r['peak_rss_8_tokens'] for r in rs) / 2**30:.2f} GiB after 8 tokens", flush=True)
    os.environ["LMLAB_CACHE"] = str(cache)
    speed(gguf, args)
    shutil.rmtree(cache, ignore_errors=True)
    return 0


def speed(gguf: Path, args) -> None:
    from lmlab.templates import chat_prompt_ids

    lm, run = engines(gguf, args.threads, args.new_tokens, args.compile)
    text = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    chat = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": "Say hello in one line."}])
    for ids, what in ((text[:32], "32-token prompt"), (text[:128], "128-token prompt"),
                      (chat, f"chat, {len(chat)}-token prompt")):
        got = {name: [] for name in run}
        for name in run:
            run[name](ids)  # warm-up
        for _ in range(args.repeats):
            for name, fn in run.items():
                start, stamps = fn(ids)
                got[name].append((stamps[0] - start, *split(stamps, start, len(ids))))
        medians = {name: [statistics.median(r[i] for r in rs) for i in range(3)] for name, rs in got.items()}
        base = medians["llama.cpp"]
        for name, (ttft, pre, dec) in medians.items():
            ratio = "" if name == "llama.cpp" else f" = {pre / base[1]:.2f}x / {dec / base[2]:.2f}x llama.cpp's"
            print(f"{what}, {name}: prefill {pre:.1f} tokens/s, decode {dec:.2f} tokens/s{ratio}, first token "
                  f"{ttft:.2f} s (decode runs {', '.join(f'{r[2]:.2f}' for r in got[name])})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
