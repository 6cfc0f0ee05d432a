"""How far the packed int8 head's logits are from its own weights, and what recomputing the top ones costs.

    python benchmarks/head_exactness.py [--tokens 1024] [--threads 2]

SmolLM2-135M-Instruct as stored (its Q8_0 embedding is the int8 head). The final hidden states of held-out
English (the Python reference's prose, as quant_perplexity.py reads it) go through the head one row at a time,
as decoding steps run it, with `exact_top` off (the kernel's bf16 outputs) and on; the reference is a float32
matmul of the same int8 weights. Prints how many greedy choices differ, the largest error on the reference's
top 20 logits, and the head's time at 1 and 8 rows (medians of 100 alternating calls). Last, the same for a 4-bit
copy of the head (groups of 32), a would-be faster pass to find the candidates: the error of all its logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from quant_perplexity import held_out_text

    import lmlab
    from lmlab.quant import EXACT_TOP, QuantLinear, quantize_int4

    lm = lmlab.load("smollm2-135m-instruct", device="cpu")
    head = lm.model.lm_head
    ids = torch.tensor([lm.tokenizer.encode(held_out_text())[:args.tokens]])
    with torch.inference_mode():
        h = lm.model(ids, head=False)[0]  # (T, C) final normed hidden states
        ref = h @ head.dequantize().t()
        top_values, top_ids = ref.topk(20, dim=-1)
        for k in (0, EXACT_TOP):
            head.exact_top = k
            out = torch.cat([head(h[i:i + 1][None])[0] for i in range(h.shape[0])])
            flips = (out.argmax(-1) != ref.argmax(-1)).sum().item()
            err = (out.gather(1, top_ids) - top_values).abs().max().item()
            print(f"exact_top={k}: greedy differs at {flips} of {h.shape[0]} positions; "
                  f"max |error| on the top 20 logits {err:.2e}")
        for rows in (1, 8):
            x = h[:rows, None]
            times: dict[int, list[float]] = {0: [], EXACT_TOP: []}
            for _ in range(100):
                for k in times:
                    head.exact_top = k
                    t = time.perf_counter()
                    head(x)
                    times[k].append(time.perf_counter() - t)
            print(f"{rows} row(s): head " + ", ".join(f"exact_top={k} {statistics.median(v) * 1e6:.0f} us"
                                                      for k, v in times.items()))
        head.exact_top = 0
        int4 = QuantLinear.from_int4(*quantize_int4(head.dequantize(), 32))
        for name, layer in (("int8 kernel", head), ("int4 copy", int4)):
            err = torch.cat([layer(h[i:i + 1][None])[0] for i in range(h.shape[0])]) - ref
            times = {rows: [] for rows in (1, 8)}
            for _ in range(40):
                for rows in times:
                    t = time.perf_counter()
                    layer(h[:rows, None])
                    times[rows].append(time.perf_counter() - t)
            print(f"{name}: every logit's error {err.pow(2).mean().sqrt():.3f} rms, {err.abs().max():.2f} at most; "
                  + ", ".join(f"{r} row(s) {statistics.median(v) * 1e6:.0f} us" for r, v in times.items()))


if __name__ == "__main__":
    main()
