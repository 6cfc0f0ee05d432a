"""What quantization costs in perplexity: SmolLM2-135M-Instruct on held-out English, float32 against int8/int4.

    python benchmarks/quant_perplexity.py [--tokens 16384] [--context 512]

The text is the Python language reference's prose as every CPython ships it (`pydoc_data.topics`: the help
topics, ~465 KB of English with some code): not Shakespeare, which the tests use, and in any Python install, so
the figure is reproducible offline. Its first --tokens tokens are scored with `lmlab.infer.evaluate` (strided sliding
windows of --context, stride half a window), once per weight format, all from the same Q4_1 GGUF:
    float32  the file dequantized (quantize="off"): the reference
    stored   as stored: Q4_1 layers as int4 groups of 32 (the same numbers), the Q8_0 embedding as int8 rows
    int8     every matmul per-channel int8, from the dequantized weights
    int4     every matmul int4 in groups of 32, from the dequantized weights (the head int8)
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch


def held_out_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--modes", default="off,stored,int8,int4")
    args = ap.parse_args()

    import lmlab
    from lmlab.infer.evaluate import evaluate
    from lmlab.quant import weights_description

    rows = []
    for mode in args.modes.split(","):
        lm = lmlab.load("smollm2-135m-instruct", device="cpu", quantize=None if mode == "stored" else mode)
        ids = torch.tensor(lm.tokenizer.encode(held_out_text())[:args.tokens])
        t = time.perf_counter()
        r = evaluate(lm, ids, batch_size=4, context=args.context, stride=args.context // 2)
        rows.append((mode, weights_description(lm.model), r.loss, math.exp(r.loss), time.perf_counter() - t))
        print(f"{mode:8s} {rows[-1][1]:28s} loss {r.loss:.4f} ppl {rows[-1][3]:.3f} ({r.tokens} tokens, "
              f"{rows[-1][4]:.0f} s)", flush=True)
    ref = rows[0][3]
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| weights | held as | perplexity | vs float32 |")
    print("|---|---|---|---|")
    for mode, desc, _, ppl, _ in rows:
        print(f"| {mode} | {desc} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% |")


if __name__ == "__main__":
    main()
