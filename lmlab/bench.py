"""`lmlab bench`: training and decoding speed, peak memory and memory-bandwidth utilisation, in one process.

Every figure is a median after warm-up, so one slow step (a page fault, a neighbour on a shared CPU) does not
move it; torch.compile's first call is timed apart (`compile_s`) and never enters a median. On CUDA each timed
region ends with torch.cuda.synchronize, since kernels run asynchronously to the host clock.

Decoding is memory-bound: each decoded token reads every matmul weight once (gpt-fast's and llama.cpp's
observation). So the decode figure is set against the bandwidth this process can reach, measured here with the
same threads: a large `copy_`, counted as read + write bytes per second (STREAM's "Copy" convention). The
utilisation is (weight bytes read per decode step x steps/s) / that bandwidth; at batch B one step decodes B
tokens but reads the weights once. KV-cache and activation traffic are left out of the numerator, so a model
with a long context can look a little less efficient than it is.

Training on CUDA is set against the matmul peak, measured the same way: a large bf16 matmul in this process
(`matmul_peak`), not the datasheet's figure, so MFU compares with nanoGPT's "of the peak measured there". The
FLOPs per token are PaLM's count (Chowdhery et al. 2022, app. B), as nanoGPT's estimate_mfu: 6 per matmul weight
(forward and backward) plus 12 * layers * d_model * context for attention's two matmuls, causal or not.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmlab.config import MAX_DEFAULT_CONTEXT, ModelConfig, TrainConfig
from lmlab.errors import LmlabError, unknown
from lmlab.model import Transformer
from lmlab.quant import (
    GROUP_SIZE,
    check_device,
    check_mode,
    kernels_description,
    quantize_model,
    weight_bytes,
    weights_description,
)
from lmlab.utils import atomic_write_text, default_dtype, progress, resolve_device, resolve_dtype

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BANDWIDTH_CONVENTION = "tensor copy_: (bytes read + bytes written) / s, median of 5"  # 1 GiB: beyond any cache


def check_count(name: str, value: int, least: int = 1) -> None:
    """A count the user gave (steps, batch, tokens) is an integer >= least, named in the error as its flag."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise LmlabError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")


def check_compile(mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise unknown("compile mode", mode, COMPILE_MODES)


@contextmanager
def threads(n: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to n for the benchmark (None: as it is), restored afterwards so a
    library caller's own setting survives. Yields the count in effect."""
    before = torch.get_num_threads()
    if n is not None:
        check_count("threads", n)
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels, so the host clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of fn takes, the device's queue drained before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that pick torch's CPU kernels


def machine(device: torch.device) -> str:
    """The hardware the figures belong to: the GPU's name, or the CPU's model name, logical core count and the
    vector flags that decide which CPU kernels run (an AVX2-only box and an AVX-512 one differ by kernels)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}  # the last core's lines: all cores are alike
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = [f for f in VECTOR_FLAGS if f in fields.get("flags", "").split()]
    return f"{name}, {os.cpu_count()} logical cores" + (f", {' '.join(flags)}" if flags else "")


def reset_peak_memory(device: torch.device) -> None:
    """Start CUDA's peak counter now. The CPU's RSS high-water mark cannot be reset: it covers the process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's max allocated since reset_peak_memory, or on CPU the process's
    resident-set high-water mark (VmHWM from /proc, else getrusage's ru_maxrss), imports and loading included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS (ru_maxrss)"


def memory_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes per second this process moves through memory with its current threads: the median time of
    dst.copy_(src) over `repeats` copies of nbytes, counted as nbytes read + nbytes written (see the module
    docstring). The first copy, which faults the pages in, is not timed."""
    src = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.nbytes / seconds


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> Transformer:
    """A randomly initialised model of cfg's shape, built directly on the device and in `dtype`: no CPU copy on
    the way to a GPU, and no float32 twin of a bf16 model (built in float32 and cast, the Llama-3.1-8B shape
    peaked at 30.9 GiB for its 16 GB of bf16 weights). Speed does not depend on the weights' values, only on
    their shapes and dtype."""
    from lmlab.training.loop import check_fits

    check_fits(cfg, device, dtype)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        return Transformer(cfg)


def compiled(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    check_compile(mode)
    return model if mode is None else torch.compile(model, mode=mode)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype` on `device`: 2 n^3 over the median of `repeats` timed
    calls after one untimed one. On an H100 n = 8192 in bf16 takes about 1.5 ms a call."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / seconds


def train_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Training FLOPs per token (module docstring): 6 x the weights that multiply (every linear, the head
    included; not the embedding tables, which are looked up) + 12 x layers x d_model x context."""
    matmul_weights = cfg.num_params() - (cfg.context_length * cfg.d_model if cfg.pos == "learned" else 0)
    if not cfg.tie_embeddings:
        matmul_weights -= cfg.vocab_size * cfg.d_model  # the input table; the separate head stays counted
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.d_model * context


def median_rate(count: int, seconds: list[float]) -> float:
    return count / statistics.median(seconds)


# ---------------------------------------------------------------------------------------------------------
# Training: forward + backward + AdamW step, as lmlab train runs it.

def train_batches(cfg: ModelConfig, batch_size: int, context: int, data: str | os.PathLike | None,
                  device: torch.device) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step -> (x, y) of shape (batch_size, context): windows of a prepared data directory's train split, as
    training samples them, or uniform random token ids (the speed is the same; no data is needed)."""
    if data is None:
        g = torch.Generator().manual_seed(0)

        def random_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.randint(0, cfg.vocab_size, (batch_size, context + 1), generator=g).to(device)
            return ids[:, :-1], ids[:, 1:]
        return random_batch
    from lmlab.data.tokens import Batches, TokenData

    batches = Batches(TokenData(data).split("train"), context, batch_size, 1, seed=0, sampling="random")
    return lambda step: batches.get(step, 0, device)


def train_config(cfg: ModelConfig, context: int | None, data: str | os.PathLike | None) -> ModelConfig:
    """cfg as the benchmark trains it: the data's vocabulary (as lmlab train sets it), and a context table long
    enough for the windows asked for."""
    if data is not None:
        from lmlab.data.tokens import TokenData

        cfg = cfg.replace(vocab_size=TokenData(data).vocab_size)
    if context is not None and context > cfg.context_length:
        cfg = cfg.replace(context_length=context)
    return cfg


def model_shape(model: str | None, preset: str | None, config: ModelConfig | None) -> tuple[ModelConfig, str]:
    """(config, name) of exactly one of: a model source (its config alone: no weight is read), a preset name, or
    a ModelConfig."""
    from lmlab.api import model_config
    from lmlab.config import preset as preset_config

    if sum(x is not None for x in (model, preset, config)) != 1:
        raise LmlabError("give --preset NAME or --model SOURCE (one of them)")
    if config is not None:
        return config, "the config given"
    return (model_config(model), str(model)) if model is not None else (preset_config(preset), preset)


def bench_train(model: str | None = None, *, preset: str | None = None, config: ModelConfig | None = None,
                batch_size: int = 12, context: int | None = None, steps: int = 20, warmup: int = 3,
                data: str | os.PathLike | None = None, device: str = "auto", dtype: str = "float32",
                compile: str | None = None, n_threads: int | None = None, shape: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training speed of a randomly initialised model of the shape of `model` (a source), `preset` or `config`
    (one of them), with the ModelConfig fields in `shape` changed (nanoGPT's bench model: bias False,
    vocab_size 50304): tokens/s and the median step time of `steps` optimizer steps after `warmup` untimed ones
    (speed depends on shapes and dtype, not on the weights' values). Each step is what lmlab train does: forward,
    loss, backward, gradient clipping and an optimizer step (TrainConfig's defaults, or the settings in `train`:
    optimizer, grad_clip, pad_vocab, fp8), with bf16 autocast for dtype="bfloat16". Compiling times its first
    step apart, as compile_s (compilation plus that one step)."""
    for flag, value, least in (("batch_size", batch_size, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        check_count(flag, value, least)
    if context is not None:
        check_count("context", context)
    tc = TrainConfig(**{**(train or {}), "dtype": dtype, "compile": compile is not None})
    if tc.optimizer == "lbfgs":
        raise LmlabError("bench train times single optimizer steps; lbfgs re-evaluates its batch inside each, so "
                         "choose another --optimizer")
    check_compile(compile)
    dev = resolve_device(device)
    if tc.fp8:
        from lmlab.training.fastpath import check_fp8

        check_fp8(dev, tc.dtype)
    cfg, name = model_shape(model, preset, config)
    cfg = train_config(cfg.replace(**(shape or {})), context, data)
    T = context or min(cfg.context_length, MAX_DEFAULT_CONTEXT)
    with threads(n_threads) as n:
        reset_peak_memory(dev)
        step_s, compile_s = _train_steps(cfg, tc, train_batches(cfg, batch_size, T, data, dev), dev, compile,
                                         warmup, steps)
        peak, peak_kind = peak_memory(dev)
        flops_peak = matmul_peak(dev) if dev.type == "cuda" else None  # a CPU's bf16 peak says little of fp32
    tokens_per_s = median_rate(batch_size * T, step_s)
    flops = train_flops_per_token(cfg, T)
    return dict(command="train", model=f"{name} (random weights)",
                **_setup(dev, n, dtype, None, compile), params=cfg.num_params(), config=cfg.to_dict(),
                batch_size=batch_size, context=T, steps=steps, warmup=warmup,
                data=None if data is None else str(data), optimizer=tc.optimizer, grad_clip=tc.grad_clip,
                pad_vocab=tc.pad_vocab, fp8=tc.fp8, compile_s=compile_s,
                step_s=statistics.median(step_s), tokens_per_s=tokens_per_s, flops_per_token=flops,
                matmul_peak_flops=flops_peak, mfu=flops * tokens_per_s / flops_peak if flops_peak else None,
                peak_memory_bytes=peak, peak_memory_kind=peak_kind)


def train_stepper(cfg: ModelConfig, tc: TrainConfig, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                  dev: torch.device, compile: str | None) -> Callable[[int], torch.Tensor]:
    """step index -> that step's loss (a device tensor): a random model of cfg's shape trained as lmlab train
    trains it (padded head on CUDA, float8 layers with tc.fp8, compiled with `compile`, the model's own loss,
    clipping, the optimizer step). benchmarks/gpu_train_step.py times it beside nanoGPT's step."""
    from contextlib import nullcontext

    from lmlab.training.fastpath import float8_training, pad_vocab, vocab_multiple
    from lmlab.training.loop import backward, step_optimizer
    from lmlab.training.optim import build_optimizer

    model = pad_vocab(random_model(cfg, dev), vocab_multiple(tc.pad_vocab, dev))  # as lmlab train: 64 on CUDA
    if tc.fp8:
        float8_training(model)
    net, opt = compiled(model, compile), build_optimizer(model, tc)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16" else nullcontext()
    net.train()

    def step(i: int) -> torch.Tensor:  # the training loop's own step (lmlab.training.loop), one micro-batch
        loss = backward(net, [batch(i)], tc, autocast)
        step_optimizer(opt)
        return loss

    return step


def _train_steps(cfg: ModelConfig, tc: TrainConfig, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 dev: torch.device, compile: str | None, warmup: int, steps: int) -> tuple[list[float], float | None]:
    """Run the steps; (timed step seconds, compile seconds or None)."""
    step = train_stepper(cfg, tc, batch, dev, compile)
    compile_s = timed(lambda: step(0), dev) if compile is not None else None
    times = [timed(lambda i=i: step(i), dev) for i in progress(range(1, 1 + warmup + steps), "training steps")]
    return times[warmup:], compile_s


def _setup(dev: torch.device, n_threads: int, dtype: str, quantize: str | None, compile: str | None) -> dict:
    """The settings every result row names, so that two rows can be compared."""
    return dict(device=str(dev), machine=machine(dev), threads=n_threads, torch=torch.__version__, dtype=dtype,
                quantization=quantize, compile=compile)


# ---------------------------------------------------------------------------------------------------------
# Decoding: prefill a random prompt, then greedy steps: the engine every caller uses (lmlab.infer.engine).

def decode_run(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """One greedy generation with EOS ignored, so every row decodes exactly new_tokens tokens: (prefill seconds,
    [seconds of each decode step]). The engine yields once per token: its first yield follows the prefill,
    each later one follows one decode step. Each yield has copied the step's ids to the host (a sync), and on
    CUDA the clock is read after an explicit one too. Each run prefills its whole prompt: the model's prompt
    cache, which holds the previous run's, is voided first."""
    from lmlab.infer.engine import forget_prompt
    from lmlab.infer.generate import SamplingConfig, generate_ids

    dev = next(model.parameters()).device
    s = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    forget_prompt(model)
    sync(dev)
    stamps = [time.perf_counter()]
    for _ in generate_ids(model, prompts, s, eos_id=None):
        sync(dev)
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    return gaps[0], gaps[1:]


def random_prompts(vocab_size: int, batch: int, prompt_tokens: int) -> list[list[int]]:
    """batch rows of prompt_tokens uniform random ids, the same for every call with the same shape."""
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab_size, (batch, prompt_tokens), generator=g).tolist()


def bench_batch(model: torch.nn.Module, batch: int, prompt_tokens: int, new_tokens: int, runs: int,
                warmup: int) -> dict[str, Any]:
    """Prefill and decode speed at one batch size: medians over `runs` generations after `warmup` untimed ones
    (the prefill's over the runs, the decode step's over every step of every run). Prompts are random ids."""
    prompts = random_prompts(model.cfg.vocab_size, batch, prompt_tokens)
    prefill, steps = [], []
    for i in progress(range(warmup + runs), f"generations at batch {batch}"):
        p, s = decode_run(model, prompts, new_tokens)
        if i >= warmup:
            prefill.append(p)
            steps += s
    step_s = statistics.median(steps)
    return dict(batch=batch, prefill_s=statistics.median(prefill),
                prefill_tokens_per_s=median_rate(batch * prompt_tokens, prefill), decode_step_s=step_s,
                decode_tokens_per_s=batch / step_s)


def generate_model(model: str | None, preset: str | None, device: str, dtype: str | None, quantize: str | None,
                   group_size: int) -> tuple[torch.nn.Module, str]:
    """(the model in eval mode, its name): loaded from any source lmlab.load takes, or a random one of a preset's
    shape (quantized after building when asked, so the float model is in the peak memory: for a quantized peak
    that means something, load a quantized file, e.g. benchmarks/synthetic_gguf.py's)."""
    import lmlab
    from lmlab.config import preset as preset_config

    if model is not None:
        return lmlab.load(model, device=device, dtype=dtype, quantize=quantize, group_size=group_size).model, str(model)
    net = random_model(preset_config(preset), resolve_device(device), resolve_dtype(dtype))
    if quantize not in (None, "off"):
        quantize_model(net, quantize, group_size=group_size)
    return net.eval(), f"preset {preset} (random weights)"


def bench_generate(model: str | None = None, *, preset: str | None = None, batch: int = 8,
                   prompt_tokens: int = 128, new_tokens: int = 32, runs: int = 3, warmup: int = 1,
                   quantize: str | None = None, group_size: int = GROUP_SIZE, device: str = "auto",
                   dtype: str | None = None, compile: str | None = None, n_threads: int | None = None,
                   bandwidth_mib: int = 1024) -> dict[str, Any]:
    """Decode and prefill speed at batch 1 and at `batch`, peak memory, and bandwidth utilisation, for a model
    source (anything lmlab.load takes) or a preset's shape with random weights. See the module docstring for
    the bandwidth convention. The bandwidth is measured last, after peak memory is read, so that its buffers
    do not count in the peak."""
    for flag, value, least in (("batch", batch, 1), ("prompt_tokens", prompt_tokens, 1),
                               ("new_tokens", new_tokens, 2), ("runs", runs, 1), ("warmup", warmup, 0),
                               ("bandwidth_mib", bandwidth_mib, 1)):
        check_count(flag, value, least)
    check_compile(compile)
    dev = resolve_device(device)
    if quantize not in (None, "off"):  # as lmlab.load checks them, but before a preset's float model is built
        check_mode(quantize, group_size)
        check_device(dev)
    with threads(n_threads) as n:
        reset_peak_memory(dev)
        check_fits_context(model, preset, prompt_tokens, new_tokens)
        net, name = generate_model(model, preset, device, dtype, quantize, group_size)
        sizes = list(dict.fromkeys((1, batch)))
        run, compile_s = _compiled_run(net, compile, sizes, prompt_tokens)
        rows = [bench_batch(run, b, prompt_tokens, new_tokens, runs, warmup) for b in sizes]
        peak, peak_kind = peak_memory(dev)
        bandwidth = memory_bandwidth(dev, bandwidth_mib * 2**20)
    wbytes = weight_bytes(net)
    for row in rows:
        row["bandwidth_utilisation"] = wbytes / row["decode_step_s"] / bandwidth
    dt = str(resolve_dtype(dtype)).removeprefix("torch.")  # the activations' dtype (quantized weights are not)
    return dict(command="generate", model=name, **_setup(dev, n, dt, quantize, compile),
                weights=weights_description(net), kernels=kernels_description(net),
                params=net.cfg.num_params(), prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                warmup=warmup, compile_s=compile_s, batches=rows, weight_bytes=wbytes,
                bandwidth_bytes_per_s=bandwidth, bandwidth_convention=BANDWIDTH_CONVENTION,
                peak_memory_bytes=peak, peak_memory_kind=peak_kind)


def check_fits_context(model: str | None, preset: str | None, prompt_tokens: int, new_tokens: int) -> None:
    """Exactly one of model and preset; prompt and new tokens must fit its context: past it the engine slides
    its window, a second prefill that would land inside the decode timings. Checked on the config alone, before
    minutes of loading a large model."""
    cfg, _ = model_shape(model, preset, None)
    if prompt_tokens + new_tokens > cfg.context_length:
        raise LmlabError(f"--prompt-tokens + --new-tokens ({prompt_tokens} + {new_tokens}) exceed the model's "
                         f"context ({cfg.context_length}); ask for fewer tokens")


def _compiled_run(net: torch.nn.Module, compile: str | None, sizes: list[int],
                  prompt_tokens: int) -> tuple[torch.nn.Module, float | None]:
    """The model to generate with, and compile_s: the seconds of a first short generation at each batch size,
    with the prompt length the benchmark uses, which compiles the decoding step for those shapes (None
    uncompiled). Only the decoding step is compiled, as lmlab.load(compile=True) and the server compile it
    (lmlab.infer.engine.compile_decoding; mode "default" means its own choice: a CUDA graph on CUDA), so the figure
    is the engine's own fast path on every device."""
    if compile is None:
        return net, None
    from lmlab.infer.engine import compile_decoding

    compile_decoding(net, None if compile == "default" else compile)
    t = time.perf_counter()
    for b in sizes:
        decode_run(net, random_prompts(net.cfg.vocab_size, b, prompt_tokens), 3)
    return net, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------
# Output: a table for people, JSON for scripts and benchmarks/results.md.

def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """The result as indented JSON, written atomically (a reader never sees half a file)."""
    import json

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return Path(path)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(r: dict[str, Any]) -> str:
    """Two columns, label and value: the settings first, then the figures."""
    rows = [("model", r["model"]), ("device", f"{r['device']} ({r['machine']})"),
            ("threads", r["threads"]), ("dtype", r["dtype"])]
    if r["command"] == "generate":
        rows.append(("quantization", f"{r['quantization'] or 'none (as stored)'}: weights {r['weights']}"))
        if r.get("kernels"):
            rows.append(("kernels", r["kernels"]))
    rows.append(("compile", r["compile"] or "off (eager)"))
    if r["compile_s"] is not None:
        rows.append(("compile time", f"{r['compile_s']:.2f} s (first call, apart from the medians)"))
    rows += _train_rows(r) if r["command"] == "train" else _generate_rows(r)
    rows.append((r["peak_memory_kind"], _size(r["peak_memory_bytes"])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _train_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    clip = f"clip {r['grad_clip']:g}" if r.get("grad_clip") else "no clipping"
    return [("params", f"{r['params']:,}"), ("batch x context", f"{r['batch_size']} x {r['context']}"),
            ("data", r["data"] or "random token ids"),
            ("step", f"{r['optimizer']}, {clip}" + (", fp8 matmuls (torchao rowwise)" if r.get("fp8") else "")),
            ("step time", f"{r['step_s'] * 1e3:.1f} ms (median of {r['steps']}, after {r['warmup']} warm-up)"),
            ("train tokens/s", f"{r['tokens_per_s']:,.0f}")] + ([
            ("MFU", f"{r['mfu']:.1%} of {r['matmul_peak_flops'] / 1e12:,.0f} TFLOP/s (bf16 matmul peak measured "
                    f"here; {r['flops_per_token'] / 1e6:,.1f} MFLOP/token)")] if r.get("mfu") else [])


def _generate_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("params", f"{r['params']:,}"),
        ("prompt / new", f"{r['prompt_tokens']} / {r['new_tokens']} tokens, median of {r['runs']} runs")]
    for b in r["batches"]:
        rows += [(f"prefill batch {b['batch']}", f"{b['prefill_tokens_per_s']:,.1f} tokens/s"),
                 (f"decode batch {b['batch']}", f"{b['decode_tokens_per_s']:,.1f} tokens/s "
                  f"({b['decode_step_s'] * 1e3:.1f} ms/step, {b['bandwidth_utilisation']:.0%} of bandwidth)")]
    rows += [("weight bytes/step", _size(r["weight_bytes"])),
             ("memory bandwidth", f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({r['bandwidth_convention']})")]
    return rows
