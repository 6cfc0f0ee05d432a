"""Would int8 activations pay on an AVX2 CPU? fbgemm's dynamic int8 linear against lmlab's kernels, then its cost
in perplexity on SmolLM2-135M-Instruct.

    python benchmarks/int8_activations.py [--threads 2] [--tokens 8192] [--skip-perplexity]

Every int4/int8 kernel torch has for this CPU multiplies in float32 after unpacking the weights, so a short
prompt's prefill (tens of rows) costs at least a float32 GEMM. The one int8-compute kernel is fbgemm's
`quantized::linear_dynamic` (int8 weights per channel; activations quantized on the fly). AVX2's u8 x s8
multiply-add saturates at int16, so fbgemm wants 7-bit activations (`reduce_range`). Part 1 times it against
float32 F.linear and the weight-only kernels lmlab uses (alternating, medians). Part 2 scores the held-out text
of benchmarks/quant_perplexity.py with every multi-row matmul of an int8 SmolLM2 (the prefill and eval path)
run through it. Its scale is per tensor; to make it per row, and a row's result independent of its batch,
each row is divided by its max |x| and a fixed calibration row [1, -1, 0, ...] pins the range to [-1, 1].
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch


def fbgemm_pack(w: torch.Tensor):
    """fbgemm's packed form of w (N, K): symmetric int8 per output channel."""
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch deprecates quantized tensors; this is the only way in
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w.float(), scale, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def fbgemm_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x (M, K) @ W^T with each row quantized on its own scale (see the module docstring)."""
    a = x.abs().amax(1, keepdim=True).clamp_min(1e-30)
    pin = torch.zeros(1, x.shape[1])
    pin[0, :2] = torch.tensor([1.0, -1.0])
    return torch.ops.quantized.linear_dynamic(torch.cat([x / a, pin]), packed, True)[:-1] * a


def alternating_medians(fns: dict, rounds: int) -> dict[str, float]:
    """Microseconds a call of each function, medians over `rounds` rounds that call them in turn (5 warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v[5:]) * 1e6 for k, v in times.items()}


def kernel_times(rounds: int = 40) -> None:
    from lmlab.quant import QuantLinear

    print("| N x K | rows | fp32 F.linear | int8 kernel | int4 kernel | fbgemm dynamic int8 |")
    print("|---|---|---|---|---|---|")
    for N, K in ((1536, 576), (576, 1536), (576, 576)):
        w = torch.randn(N, K) * 0.05
        q8, q4, packed = (QuantLinear.from_float(w, None, "int8"), QuantLinear.from_float(w, None, "int4"),
                          fbgemm_pack(w))
        for M in (1, 8, 37):
            x = torch.randn(M, K)
            med = alternating_medians({"fp32": lambda x=x, w=w: x @ w.t(), "int8": lambda x=x, q=q8: q(x),
                                       "int4": lambda x=x, q=q4: q(x),
                                       "fbgemm": lambda x=x, p=packed: fbgemm_linear(x, p)}, rounds)
            print(f"| {N} x {K} | {M} | " + " | ".join(f"{v:.0f}" for v in med.values()) + " |", flush=True)


def perplexity(tokens: int) -> None:
    from quant_perplexity import held_out_text

    import lmlab
    from lmlab import quant
    from lmlab.infer.evaluate import evaluate

    plain = quant.QuantLinear.forward

    def through_fbgemm(self, x, skip: set[str]):
        x2 = x.reshape(-1, self.in_features)
        if (x.dim() > 2 and x.shape[-2] == 1) or len(x2) < 2 or self.role in skip:
            return plain(self, x)
        if not hasattr(self, "packed"):
            self.packed = fbgemm_pack(self.dequantize())
        y = fbgemm_linear(x2, self.packed).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    lm = lmlab.load("smollm2-135m-instruct", device="cpu", quantize="int8")
    for name, m in lm.model.named_modules():
        if isinstance(m, quant.QuantLinear):
            m.role = "head" if name == "lm_head" else name.rsplit(".", 1)[-1]
    ids = torch.tensor(lm.tokenizer.encode(held_out_text())[:tokens])
    print("\n| int8 SmolLM2, multi-row matmuls | perplexity |\n|---|---|")
    for label, skip in (("float activations (lmlab)", None), ("fbgemm, every matmul", set()),
                        ("fbgemm, not the head", {"head"}), ("fbgemm, not the head or down", {"head", "down"})):
        quant.QuantLinear.forward = plain if skip is None else lambda self, x, s=skip: through_fbgemm(self, x, s)
        try:
            r = evaluate(lm, ids, batch_size=4, context=512, stride=256, quiet=True)
        finally:
            quant.QuantLinear.forward = plain
        print(f"| {label} | {math.exp(r.loss):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skip-perplexity", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    from lmlab.bench import machine

    print(f"machine: {machine(torch.device('cpu'))}, {args.threads} threads; torch {torch.__version__}; "
          "microseconds a call, medians of 35 alternating calls\n")
    kernel_times()
    if not args.skip_perplexity:
        perplexity(args.tokens)


if __name__ == "__main__":
    main()
