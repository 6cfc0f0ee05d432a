"""Where the 8B's time goes on a CPU, and the routes torch offers for its matmuls (issue 25's profile).

    python benchmarks/cpu_8b_profile.py [--gguf /tmp/llama8b-q4_0.gguf] [--threads 2] [--parts profile,routes,fusion]

profile  torch.profiler over 10 eager decoding steps and two 32-token prefills of the packed model: self CPU time
         of the int4 matmuls, the int8 head, attention and the rest.
routes   each way torch can run the 8B's q/k/v (6144 x 4096) and gate/up (28672 x 4096) matmuls at 32 and 128
         rows, alternating, best of 3: the int4 kernel lmlab uses, Inductor's WoQ int4 GEMM template
         (max-autotune with freezing), unpacking to float32 for a float32 GEMM, a bf16 GEMM on weights already
         unpacked, and torch._int_mm (int8 x int8) alone; then Inductor's int8 WoQ template for the head against
         the aten kernel, speed and error against float32.
fusion   the model with each SwiGLU's gate and up as one packed matmul (lmlab.load) against the same file loaded
         with them apart, decoding steps alternating in one process, and whether their logits are equal.
The file is benchmarks/synthetic_gguf.py's (written first when missing). Figures in benchmarks/results.md.
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


def best(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def shares(prof, n: int) -> None:
    rows = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(rows.values())
    groups = {"int4 matmuls (_weight_int4pack_mm_for_cpu)": ["aten::_weight_int4pack_mm_for_cpu"],
              "int8 head (_weight_int8pack_mm)": ["aten::_weight_int8pack_mm"],
              "attention (bmm, softmax, sdpa, cache writes)": [
                  "aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::index_copy_"]}
    out = [(g, sum(rows.get(k, 0) for k in keys)) for g, keys in groups.items()]
    out.append(("everything else (norms, RoPE, casts, SwiGLU, the head's top-32)", total - sum(t for _, t in out)))
    for g, t in out:
        print(f"  {g}: {t / n / 1e3:.1f} ms ({t / total:.0%})")
    print(f"  total {total / n / 1e3:.1f} ms", flush=True)


def profile(gguf: Path) -> None:
    from torch.profiler import profile as torch_profile

    import lmlab

    model = lmlab.load(gguf, device="cpu").model

    def run(ids, pos):
        with torch.no_grad():
            return model(ids, input_pos=pos, last_only=True)

    model.use_cache(model.make_cache(1, 256))
    one = torch.tensor([[1000]])
    for p in range(4):
        run(one, torch.tensor([p]))
    times = sorted(best(lambda p=p: run(one, torch.tensor([p])), 1) for p in range(4, 24))
    print(f"decoding step: median {times[len(times) // 2] * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms")
    with torch_profile() as prof:
        for p in range(24, 34):
            run(one, torch.tensor([p]))
    print("decoding step (mean of 10, profiled):")
    shares(prof, 10)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 32))
    print(f"32-token prefill: {best(lambda: run(prompt, torch.arange(32)), 1):.2f} s")
    with torch_profile() as prof:
        for _ in range(2):
            run(prompt, torch.arange(32))
    print("32-token prefill (mean of 2, profiled):")
    shares(prof, 2)
    model.clear_cache()


class Int4(torch.nn.Module):
    """One int4 matmul as a module with its weights as buffers: what Inductor's freezing makes constants of."""

    def __init__(self, q) -> None:
        super().__init__()
        self.register_buffer("w", q.weight)
        self.register_buffer("sz", q.scales_zeros)

    def forward(self, x):
        return torch._weight_int4pack_mm_for_cpu(x, self.w, 32, self.sz)


class Int8(torch.nn.Module):
    def __init__(self, codes, scale) -> None:
        super().__init__()
        self.register_buffer("w", codes)
        self.register_buffer("s", scale)

    def forward(self, x):
        return torch._weight_int8pack_mm(x, self.w, self.s)


def template(module: torch.nn.Module):
    import torch._inductor.config as ic

    ic.freezing, ic.epilogue_fusion = True, False  # an epilogue on a 3-D output failed to compile ("wrong ndim")
    torch._dynamo.reset()
    return torch.compile(module, mode="max-autotune-no-cudagraphs", dynamic=False)


def routes() -> None:
    from lmlab.quant import QuantLinear

    for N, K in ((6144, 4096), (28672, 4096)):
        torch.manual_seed(0)
        q = QuantLinear.from_float(torch.randn(N, K) * 0.02, None, "int4", 32)
        for M in (32, 128):
            got_t, err = route_times(q, M)
            flops = 2 * M * N * K
            print(f"{N}x{K}, {M} rows: " + "; ".join(f"{k} {t * 1e3:.1f} ms ({flops / t / 1e9:.0f} G/s)"
                                                   for k, t in got_t.items()) + f"; template rel. error {err:.1e}",
                  flush=True)
    head()


def route_times(q, M: int) -> tuple[dict[str, float], float]:
    """Each route's best time for M rows through QuantLinear q's weight, and the template's relative error."""
    N, K = q.out_features, q.in_features
    wt = q.dequantize_t()
    wtb, wi8 = wt.bfloat16(), torch.randint(-8, 8, (K, N), dtype=torch.int8)
    x = torch.randn(M, K)
    xb, xi8 = x.bfloat16(), torch.randint(-127, 127, (M, K), dtype=torch.int8)
    with torch.no_grad():
        tmpl = template(Int4(q))
        ref, got = x @ wt, tmpl(xb).float()
    cands = {"int4 kernel": lambda: torch._weight_int4pack_mm_for_cpu(xb, q.weight, 32, q.scales_zeros),
             "Inductor WoQ template": lambda: tmpl(xb),
             "unpack f32 + f32 GEMM": lambda: x @ q.dequantize_t(),
             "bf16 GEMM alone": lambda: xb @ wtb,
             "_int_mm int8 alone": lambda: torch._int_mm(xi8, wi8)}
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(2):  # alternating rounds
        for k, fn in cands.items():
            times[k].append(best(fn))
    return {k: min(t) for k, t in times.items()}, ((got - ref).norm() / ref.norm()).item()


def head() -> None:
    N, K = 128256, 4096
    torch.manual_seed(0)
    codes = torch.randint(-127, 127, (N, K), dtype=torch.int8)
    scale, x = (torch.rand(N) * 0.01).bfloat16(), torch.randn(1, K).bfloat16()
    ref = x.float() @ (codes.float() * scale.float()[:, None]).t()
    aten = Int8(codes, scale)
    with torch.no_grad():
        tmpl = template(Int8(codes, scale))
        errs = [(m(x).float() - ref).abs().max().item() for m in (aten, tmpl)]
        times = [min(best(lambda m=m: m(x)) for _ in range(3)) for m in (aten, tmpl)]
    print(f"int8 head {N}x{K}: aten {times[0] * 1e3:.1f} ms (max error {errs[0]:.2f}), Inductor template "
          f"{times[1] * 1e3:.1f} ms (max error {errs[1]:.2f}); logits up to {ref.abs().max().item():.0f}", flush=True)


def fusion(gguf: Path) -> None:
    import lmlab
    from lmlab.weights.gguf import load_gguf

    models = {"gate and up apart": load_gguf(gguf, fuse=False)[0], "fused": lmlab.load(gguf, device="cpu").model}
    one = torch.tensor([[1000]])
    for m in models.values():
        m.use_cache(m.make_cache(1, 256))
    times = {k: [] for k in models}
    for step in range(48):
        for name, m in models.items():
            with torch.no_grad():
                pos = torch.tensor([step % 200])
                times[name].append(best(lambda m=m, pos=pos: m(one, input_pos=pos, last_only=True), 1))
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t) * 1e3:.1f} ms, min {min(t) * 1e3:.1f} ms a step")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        a, b = (m(ids, input_pos=torch.arange(3), last_only=True) for m in models.values())
    print(f"equal logits: {torch.equal(a, b)}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="/tmp/llama8b-q4_0.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="profile,routes,fusion")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    parts = args.parts.split(",")
    if {"profile", "fusion"} & set(parts) and not gguf.exists():
        subprocess.run([sys.executable, str(HERE / "synthetic_gguf.py"), "--preset", "llama-3.1-8b", "--qtype",
                        "Q4_0", "--out", str(gguf)], check=True)
    for part in parts:
        print(f"== {part}", flush=True)
        {"profile": lambda: profile(gguf), "routes": routes, "fusion": lambda: fusion(gguf)}[part]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
