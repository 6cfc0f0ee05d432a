"""The matmul kernels behind lmlab.quant, one layer at a time: float32 F.linear against torch's int8 and int4
weight-only kernels, with float32 and bfloat16 activations, at 1, 8 and 512 rows of input.

    python benchmarks/quant_kernels.py [--threads 2] [--shapes smollm2|llama8b]

Why this exists: on an AVX2-only CPU the int kernels are fast only with bfloat16 activations (their float32
path is scalar), and only for a few rows; this table is where lmlab.quant's two choices come from (cast the
activations to bf16 for the kernel; from GEMM_ROWS rows on, unpack the weight and run a float GEMM: the last
column, against the kernel's, gives the crossover). Each
figure is the median of 30 calls after 3 warm-ups, in microseconds; the weight is the same tensor every call,
so small shapes sit in cache and show kernel speed rather than memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"smollm2": [(960, 576), (1536, 576), (576, 1536), (49152, 576)],
          "llama8b": [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)]}


def median_us(fn, *args, n: int = 30) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def row(N: int, K: int, M: int) -> dict[str, float]:
    from lmlab.quant import QuantLinear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, K, generator=g) * 0.02, torch.randn(M, K, generator=g)
    q8, q4 = QuantLinear.from_float(w, None, "int8"), QuantLinear.from_float(w, None, "int4")
    xb = x.bfloat16()
    return {
        "fp32 F.linear": median_us(F.linear, x, w),
        "int8 kernel, fp32 act": median_us(torch._weight_int8pack_mm, x, q8.weight, q8.scale.float()),
        "int8 kernel, bf16 act": median_us(torch._weight_int8pack_mm, xb, q8.weight, q8.scale),
        "int4 kernel, bf16 act": median_us(torch._weight_int4pack_mm_for_cpu, xb, q4.weight, 32, q4.scales_zeros),
        "QuantLinear int8": median_us(q8, x),
        "QuantLinear int4": median_us(q4, x),
        "int4 unpack + fp32 GEMM": median_us(lambda: x @ q4.dequantize_t()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="smollm2", choices=list(SHAPES))
    ap.add_argument("--rows", default="1,8,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header = None
    for M in map(int, args.rows.split(",")):
        for N, K in SHAPES[args.shapes]:
            r = row(N, K, M)
            if header is None:
                header = list(r)
                print("| rows | N x K | " + " | ".join(header) + " |")
                print("|---" * (len(header) + 2) + "|")
            print(f"| {M} | {N} x {K} | " + " | ".join(f"{r[h]:.0f}" for h in header) + " |", flush=True)


if __name__ == "__main__":
    main()
