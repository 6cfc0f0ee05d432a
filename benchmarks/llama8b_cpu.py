"""Llama-3.1-8B-Instruct's shape on a CPU box: load a Q4 GGUF packed, then decode; load time, peak RSS and
tokens/s. The real weights cannot be downloaded here, so the file is synthetic (benchmarks/synthetic_gguf.py:
random quantized blocks in llama.cpp's layout, a real tokenizer): the loader and the kernels do the same work
on it as on the real file.

    python benchmarks/llama8b_cpu.py [--gguf /tmp/llama8b-q4_0.gguf] [--qtype Q4_0] [--new-tokens 16]

Writes the file first when it is missing (~4.7 GB, ~35 s). The measurement runs in a fresh process so the
peak RSS (VmHWM) is the load's and the decode's alone, with the Python and torch start-up in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MEASURE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import lmlab
from lmlab.infer.generate import SamplingConfig, generate_ids
from lmlab.quant import weight_bytes, weights_description

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

t = time.perf_counter()
lm = lmlab.load(sys.argv[1], device="cpu")
load_s, rss_load = time.perf_counter() - t, hwm()
ids = lm.tokenizer.encode("The capital of France is")
n = int(sys.argv[2])
start, stamps = time.perf_counter(), []
for _ in generate_ids(lm.model, [ids], SamplingConfig(max_new_tokens=n, temperature=0), eos_id=None):
    stamps.append(time.perf_counter())
print(json.dumps(dict(load_s=load_s, peak_rss_after_load=rss_load, peak_rss=hwm(), prompt_tokens=len(ids),
                      prefill_s=stamps[0] - start, decode_tokens_per_s=(n - 1) / (stamps[-1] - stamps[0]),
                      weight_bytes=weight_bytes(lm.model), weights=weights_description(lm.model),
                      params=lm.model.num_params() if hasattr(lm.model, "num_params") else None)))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="/tmp/llama8b-q4_0.gguf")
    ap.add_argument("--qtype", default="Q4_0")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.gguf)
    if not path.is_file():  # with SmolLM2's tokenizer, padded to Llama 3's vocabulary
        writer = Path(__file__).parent / "synthetic_gguf.py"
        subprocess.run([sys.executable, str(writer), "--preset", "llama-3.1-8b", "--qtype", args.qtype,
                        "--out", str(path)], check=True)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(args.new_tokens), str(args.threads)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        sys.exit(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    print(f"file {size / 2**30:.2f} GiB; {out['weights']}; "
          f"weights read per token {out['weight_bytes'] / 2**30:.2f} GiB")
    print(f"load {out['load_s']:.1f} s; peak RSS after load {out['peak_rss_after_load'] / 2**30:.2f} GiB, "
          f"after decoding {out['peak_rss'] / 2**30:.2f} GiB")
    print(f"prefill of {out['prompt_tokens']} tokens {out['prefill_s']:.1f} s; decode "
          f"{out['decode_tokens_per_s']:.2f} tokens/s ({args.threads} threads)")


if __name__ == "__main__":
    main()
