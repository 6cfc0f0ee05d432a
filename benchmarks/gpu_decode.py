"""GPU decode rows of issue 10: lmlab's CUDA-graph decoding against HF transformers, random bf16 weights, one run.

    python benchmarks/gpu_decode.py [--new-tokens 256] [--prompt-tokens 32] [--batch 16] [--skip-8b]

Rows: SmolLM2-135M shape at batch 1 and at --batch (aggregate tokens/s), for lmlab (lmlab.bench.bench_generate,
the engine's compiled CUDA-graph step) and HF transformers (`generate`, greedy, EOS ignored, with its dynamic
cache, then with its static cache and the forward compiled as HF documents: reduce-overhead, fullgraph); then
the Llama-3.1-8B shape at batch 1 for lmlab, with its bandwidth utilisation (MBU: weight bytes per step x steps/s
over a tensor copy's bandwidth measured in the same process). Decode tokens/s exclude the prefill: HF's are
(new - 1) tokens over the time of a generation less that of a one-token generation (the prefill and first token).
Prints one line per row; paste them into benchmarks/results.md with the GPU model and torch version printed first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def hf_model(preset: str):
    """A transformers LlamaForCausalLM of the preset's shape, random bf16 weights on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.config import preset as preset_config

    c = preset_config(preset)
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      max_position_embeddings=c.context_length, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                      tie_word_embeddings=c.tie_embeddings)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def hf_seconds(model, batch: int, prompt: int, new: int, repeats: int, **generate_kwargs) -> float:
    """Median seconds of one greedy generation of `new` tokens (EOS ignored) after one untimed warm-up."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **generate_kwargs)

    def once() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    once()
    return statistics.median(once() for _ in range(repeats))


def hf_decode_rate(model, batch: int, prompt: int, new: int, repeats: int, **kw) -> float:
    """Decode tokens/s (all rows): (new - 1) steps over a full generation's time less a one-token one's."""
    full = hf_seconds(model, batch, prompt, new, repeats, **kw)
    first = hf_seconds(model, batch, prompt, 1, repeats, **kw)
    return batch * (new - 1) / (full - first)


def hf_rows(args) -> None:
    model = hf_model("smollm2-135m")
    for b in (1, args.batch):
        rate = hf_decode_rate(model, b, args.prompt_tokens, args.new_tokens, args.repeats)
        print(f"HF smollm2-135m bf16 batch {b}, dynamic cache: {rate:,.0f} tokens/s")
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    for b in (1, args.batch):
        rate = hf_decode_rate(model, b, args.prompt_tokens, args.new_tokens, args.repeats,
                              cache_implementation="static")
        print(f"HF smollm2-135m bf16 batch {b}, static cache + compile: {rate:,.0f} tokens/s")


def lmlab_row(preset: str, batch: int, args) -> None:
    from lmlab.bench import bench_generate

    r = bench_generate(preset=preset, batch=batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       runs=args.repeats, warmup=1, device="cuda", dtype="bfloat16", compile="default")
    for row in r["batches"]:
        print(f"lmlab {preset} bf16 batch {row['batch']}, CUDA-graph step: {row['decode_tokens_per_s']:,.0f} "
              f"tokens/s, MBU {row['bandwidth_utilisation']:.0%} of {r['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s "
              f"(compile {r['compile_s']:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-8b", action="store_true", help="leave out the Llama-3.1-8B row (needs ~50 GB free)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py: no CUDA GPU here")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    lmlab_row("smollm2-135m", args.batch, args)
    hf_rows(args)
    if not args.skip_8b:
        lmlab_row("llama-3.1-8b", 1, args)


if __name__ == "__main__":
    main()
