"""`lmlab bench train|generate`: the real command on tiny models, its JSON checked against numbers computed here
independently (the weight bytes from the config's shapes, the peak RSS against getrusage), and bad input.

The commands run in-process through lmlab.cli.main (as most of tests/test_cli.py does), one torch thread, tiny
shapes and a 32 MiB bandwidth copy, so the file runs in a few seconds. torch.compile is in a slow test.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys

import pytest
import torch

from lmlab.cli import main
from lmlab.config import preset
from tests.conftest import lmlab_cmd, subprocess_env


def bench(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["bench", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_json(capsys, tmp_path, *args: str) -> tuple[dict, str]:
    """The command's JSON, with rss_before added: this process's peak RSS before it ran."""
    path, before = tmp_path / "bench.json", max_rss()
    rc, out, err = bench(capsys, *args, "--threads", "1", "--json", str(path))
    assert rc == 0, err
    assert f"wrote {path}" in out
    return dict(json.loads(path.read_text()), rss_before=before), out


def matmuls(name: str) -> list[tuple[int, int]]:
    """(out, in) of every matmul weight of a preset, from its config: qkv, proj and the MLP's two or three matrices
    per block, then the head (an embedding tied to it still counts: the head multiplies by all of it)."""
    c = preset(name)
    block = [((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.d_model), (c.d_model, c.d_model),
             *[(c.d_ff, c.d_model)] * (2 if c.mlp == "swiglu" else 1), (c.d_model, c.d_ff)]
    return block * c.n_layers + [(c.vocab_size, c.d_model)]


def check_setup(r: dict, command: str) -> None:
    assert r["command"] == command
    assert r["device"] == "cpu" and r["threads"] == 1 and r["compile"] is None and r["compile_s"] is None
    assert r["torch"] == torch.__version__
    assert r["peak_memory_kind"] == "peak RSS (VmHWM)"
    # the process's high-water mark, against a second route (getrusage) read before and after the command. The
    # kernel keeps the two counters apart (per-thread RSS counts are folded in lazily): 2% of slack
    assert 0.98 * r["rss_before"] <= r["peak_memory_bytes"] <= 1.02 * max_rss()


def test_train_random_ids(capsys, tmp_path):
    threads_before = torch.get_num_threads()
    r, out = run_json(capsys, tmp_path, "train", "--preset", "char-cpu", "--batch-size", "4", "--context", "32",
                      "--steps", "4", "--warmup", "1")
    check_setup(r, "train")
    assert torch.get_num_threads() == threads_before  # --threads is undone afterwards
    assert r["model"] == "char-cpu (random weights)" and r["dtype"] == "float32" and r["data"] is None
    assert (r["batch_size"], r["context"], r["steps"], r["warmup"]) == (4, 32, 4, 1)
    assert r["params"] == preset("char-cpu").num_params()
    assert 0 < r["step_s"] < 10
    assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_s"])
    assert "train tokens/s" in out and "step time" in out


def test_train_on_data_takes_its_vocabulary(capsys, tmp_path, char_data):
    from lmlab.data.tokens import TokenData

    r, _ = run_json(capsys, tmp_path, "train", "--preset", "llama-cpu", "--data", str(char_data), "--batch-size", "2",
                    "--steps", "2", "--warmup", "0", "--dtype", "bfloat16")
    assert r["data"] == str(char_data) and r["dtype"] == "bfloat16"
    assert r["config"]["vocab_size"] == TokenData(char_data).vocab_size
    assert r["context"] == preset("llama-cpu").context_length and r["tokens_per_s"] > 0


def test_train_model_shape(capsys, tmp_path, char_run):
    """--model takes a model's shape, not its weights; a --context past the model's grows its position table."""
    from lmlab.api import model_config

    r, _ = run_json(capsys, tmp_path, "train", "--model", str(char_run), "--batch-size", "1", "--context", "300",
                    "--steps", "1", "--warmup", "0")
    assert r["config"] == model_config(char_run).replace(context_length=300).to_dict()
    assert r["context"] == 300 and r["tokens_per_s"] == pytest.approx(300 / r["step_s"])


def test_train_library_config():
    """From Python: any ModelConfig, the result as a dict; exactly one of model, preset and config."""
    from lmlab import bench
    from lmlab.config import ModelConfig
    from lmlab.errors import LmlabError

    cfg = ModelConfig(family="llama", vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2)
    r = bench.bench_train(config=cfg, batch_size=2, steps=1, warmup=0, n_threads=1)
    assert r["config"] == cfg.to_dict() and r["context"] == 8 and r["tokens_per_s"] > 0
    with pytest.raises(LmlabError, match="one of them"):
        bench.bench_train("char-cpu", preset="char-cpu")


def test_generate_preset(capsys, tmp_path):
    r, out = run_json(capsys, tmp_path, "generate", "--preset", "llama-cpu", "--batch", "3", "--prompt-tokens", "8",
                      "--new-tokens", "6", "--runs", "2", "--warmup", "1", "--bandwidth-mib", "32")
    check_setup(r, "generate")
    assert r["quantization"] is None and r["dtype"] == "float32"
    assert r["weights"] == "float32"
    assert r["weight_bytes"] == 4 * sum(n * k for n, k in matmuls("llama-cpu"))
    assert 1e8 < r["bandwidth_bytes_per_s"] < 1e13  # 0.1 GB/s .. 10 TB/s: a real memory system
    assert [b["batch"] for b in r["batches"]] == [1, 3]
    for b in r["batches"]:
        assert b["decode_tokens_per_s"] == pytest.approx(b["batch"] / b["decode_step_s"])
        assert b["prefill_tokens_per_s"] == pytest.approx(b["batch"] * 8 / b["prefill_s"])
        assert b["decode_tokens_per_s"] > 0 and b["prefill_tokens_per_s"] > 0
        assert b["bandwidth_utilisation"] == pytest.approx(
            r["weight_bytes"] / b["decode_step_s"] / r["bandwidth_bytes_per_s"])
        assert 0 < b["bandwidth_utilisation"] < 1.5
    for label in ("prefill batch 1", "decode batch 3", "memory bandwidth", "peak RSS"):
        assert label in out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_quantized(capsys, tmp_path, mode):
    """--quantize: the bytes a step reads shrink as the format says. int8: one byte a weight plus a bf16 scale per
    output row, every matmul; int4: half a byte a weight plus its scales, the head kept at int8 (lmlab.quant)."""
    r, out = run_json(capsys, tmp_path, "generate", "--preset", "llama-cpu", "--quantize", mode, "--batch", "2",
                      "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--warmup", "1",
                      "--bandwidth-mib", "32")
    *blocks, (vocab, d) = matmuls("llama-cpu")
    int8_bytes = sum(n * k + 2 * n for n, k in blocks) + vocab * d + 2 * vocab
    if mode == "int8":
        assert r["weights"] == "int8" and r["weight_bytes"] == int8_bytes
    else:
        assert r["weights"] == "int4 (group 32) + int8"
        assert sum(n * k // 2 for n, k in blocks) + vocab * d < r["weight_bytes"] < int8_bytes
    assert r["quantization"] == mode and re.search(rf"\nquantization +{mode}: weights {re.escape(r['weights'])}", out)
    assert all(0 < b["bandwidth_utilisation"] < 1.5 and b["decode_tokens_per_s"] > 0 for b in r["batches"])


def test_generate_model_source(capsys, tmp_path, char_run):
    """A saved checkpoint, through lmlab.load; batch 1 alone when --batch is 1."""
    r, _ = run_json(capsys, tmp_path, "generate", "--model", str(char_run), "--batch", "1", "--prompt-tokens", "4",
                    "--new-tokens", "3", "--runs", "1", "--warmup", "0", "--bandwidth-mib", "32")
    assert r["model"] == str(char_run)
    assert [b["batch"] for b in r["batches"]] == [1]
    assert r["batches"][0]["decode_tokens_per_s"] > 0


BUILD_PEAK = """
import sys, torch
from lmlab.bench import random_model
from lmlab.config import ModelConfig

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

cfg = ModelConfig(family="llama", vocab_size=32000, context_length=256, d_model=1024, d_ff=2816, n_layers=8,
                  n_heads=16, n_kv_heads=4)
before = hwm()
model = random_model(cfg, torch.device("cpu"), getattr(torch, sys.argv[1]))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(hwm() - before, weights, {str(p.dtype) for p in model.parameters()})
"""


def test_every_timed_run_prefills_its_whole_prompt():
    """A model keeps its last prompt's keys and values between calls (lmlab.infer.engine.engine_for), which would
    make every batch-1 run after the first prefill one token of its repeated prompt; bench voids them first."""
    from lmlab.bench import decode_run, random_prompts
    from lmlab.config import ModelConfig
    from lmlab.infer.engine import _ENGINES
    from lmlab.infer.generate import SamplingConfig, generate_ids
    from lmlab.model import Transformer

    model = Transformer(ModelConfig(family="llama", vocab_size=64, context_length=64, d_model=32, n_layers=1,
                                    n_heads=2)).eval()
    prompts = random_prompts(64, 1, 24)
    for _ in range(3):
        decode_run(model, prompts, 4)
    assert _ENGINES[model].cached_tokens == 0
    list(generate_ids(model, prompts, SamplingConfig(max_new_tokens=4, temperature=0)))  # not voided: reused
    assert _ENGINES[model].cached_tokens == 23


def test_a_bf16_random_model_never_allocates_its_float32_twin():
    """The peak RSS a bf16 random model adds while it is built (a fresh process, so the high-water mark is its
    own) stays near its bf16 bytes: building in float32 and casting would add twice them. float32 checks the
    measure itself: its peak is its own float32 bytes."""
    peaks = {}
    for dtype in ("bfloat16", "float32"):
        p = subprocess.run([sys.executable, "-c", BUILD_PEAK, dtype], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)
        assert p.returncode == 0, p.stderr
        grown, weights, dtypes = p.stdout.split(maxsplit=2)
        peaks[dtype] = int(grown), int(weights)
        assert dtypes.strip() == f"{{'torch.{dtype}'}}"
    (bf16_peak, bf16_bytes), (fp32_peak, fp32_bytes) = peaks["bfloat16"], peaks["float32"]
    assert fp32_bytes == 2 * bf16_bytes > 400 * 2**20
    assert 0.9 * fp32_bytes < fp32_peak < 1.25 * fp32_bytes  # the measure sees a model's weights
    assert 0.9 * bf16_bytes < bf16_peak < 1.25 * bf16_bytes  # a float32 twin would make it >= 3x bf16_bytes


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "no-such"], "unknown preset 'no-such'"),
    (["train", "--preset", "char-cpu", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["train", "--preset", "char-cpu", "--dtype", "float16"], "unknown training dtype 'float16'"),
    (["train", "--preset", "char-cpu", "--compile", "fastest"], "unknown compile mode 'fastest'"),
    (["train", "--stepz", "3"], "did you mean '--steps'?"),
    (["train"], "give --preset NAME or --model SOURCE"),
    (["generate", "--preset", "char-cpu", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["generate", "--preset", "char-cpu", "--quantize", "int3"], "unknown quantization 'int3'"),
    (["generate", "--preset", "char-cpu", "--quantize", "int4", "--group-size", "48"], "group size must be 32, 64"),
    (["generate", "--preset", "char-cpu", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["generate", "--preset", "char-cpu", "--new-tokens", "1"], "--new-tokens must be an integer >= 2, got 1"),
    (["generate", "--preset", "char-cpu", "--model", "x"], "give --preset NAME or --model SOURCE"),
    (["generate", "--preset", "char-cpu", "--prompt-tokens", "60", "--new-tokens", "8"], "exceed the model's context"),
    (["generate", "--model", "no/such/model"], "model not found"),
])
def test_bad_input_is_one_line(capsys, args, message):
    rc, out, err = bench(capsys, *args)
    assert rc == 2 and out == ""
    assert err.startswith("lmlab: error: ") and err.count("\n") == 1 and message in err


def test_real_process(tmp_path):
    """python -m lmlab bench: the table on stdout and the JSON file, exit 0."""
    path = tmp_path / "out" / "r.json"
    p = subprocess.run(lmlab_cmd("bench", "generate", "--preset", "char-cpu", "--batch", "2", "--prompt-tokens", "4",
                                 "--new-tokens", "3", "--runs", "1", "--bandwidth-mib", "32", "--json", str(path)),
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "decode batch 2" in p.stdout and json.loads(path.read_text())["batches"][1]["batch"] == 2


@pytest.mark.slow
def test_compile_time_apart(capsys, tmp_path):
    """--compile: the first step (which compiles) is reported as compile_s, outside the medians."""
    r, out = run_json(capsys, tmp_path, "train", "--preset", "char-cpu", "--batch-size", "2", "--context", "16",
                      "--steps", "2", "--warmup", "1", "--compile")
    assert r["compile"] == "default" and r["compile_s"] > r["step_s"] > 0
    assert "compile time" in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
