"""Decode speed of SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to float32) on this CPU:
lmlab's KV-cached engine versus HF transformers' generate on the same file, measured in the same run.

    python benchmarks/decode_smollm2.py [--new-tokens 128] [--repeats 3]

Both decode greedily for exactly --new-tokens tokens after the same chat-templated prompt (EOS ignored), with
the same torch thread count; runs alternate between the two so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import transformers

    import lmlab
    from lmlab.chat import chat_prompt_ids
    from lmlab.fetch import NAMED_MODELS, fetch
    from lmlab.generate import SamplingConfig, generate_ids

    lm = lmlab.load("smollm2-135m-instruct", device="cpu")
    asset = NAMED_MODELS["smollm2-135m-instruct"]
    entry = fetch(asset)
    gguf = next(entry.glob("*.gguf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(entry, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": "What is dropout in neural networks?"}])
    n = args.new_tokens
    s = SamplingConfig(max_new_tokens=n, temperature=0)

    def run_lmlab() -> float:
        t = time.perf_counter()
        out = list(generate_ids(lm.model, [ids], s, eos_id=None))
        assert len(out) == n
        return time.perf_counter() - t

    def run_hf() -> float:
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - t

    run_lmlab(), run_hf()  # warm-up
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_lmlab())
        theirs.append(run_hf())
    tps_ours, tps_hf = n / statistics.median(ours), n / statistics.median(theirs)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"prompt {len(ids)} tokens, {n} new tokens, greedy, float32, median of {args.repeats}")
    print(f"lmlab:        {tps_ours:7.1f} tokens/s")
    print(f"transformers: {tps_hf:7.1f} tokens/s")
    print(f"ratio lmlab / transformers: {tps_ours / tps_hf:.2f}x")


if __name__ == "__main__":
    main()
