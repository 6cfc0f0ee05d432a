"""The GPU fast paths, checked on CPU: no host sync per training step, the losses of a plain torch loop, a padded
vocabulary that leaves logits and checkpoints as they were, compiled against eager, and the compiled decoding step
against the plain one. The CUDA-only pieces (CUDA graphs, pinned copies, MFU against a bf16 peak) are skipped here
without a GPU."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lmlab.config import ModelConfig, TrainConfig
from lmlab.data.tokens import Batches, TokenData
from lmlab.model import Transformer
from lmlab.training.loop import train

TINY = ModelConfig(family="gpt2", vocab_size=65, context_length=32, d_model=32, n_layers=2, n_heads=2, bias=False)
LMLAB = str(Path(__file__).resolve().parents[1] / "lmlab")
# Every way Python code makes the host wait for a tensor's value.
SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def host_reads():
    """Count the calls that read a tensor's value on the host, made from lmlab's own code (torch's internals on
    CPU read CPU-side optimizer counters, which are no device sync on a GPU either). Yields the list of callers."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(LMLAB):
                calls.append(f"{name} in {caller.f_code.co_name} ({Path(caller.f_code.co_filename).name})")
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def tiny_run(char_data: Path, run_dir: Path, **train_settings) -> TrainConfig:
    settings = dict(max_steps=12, batch_size=4, eval_batches=2, seed=3, device="cpu", threads=1)
    tc = TrainConfig(**{**settings, **train_settings})
    train(TINY, tc, char_data, run_dir, quiet=True)
    return tc


def test_no_host_sync_per_training_step(tmp_path, char_data):
    """Twice the steps between two logs cost no extra host read: the loss stays on the device until the log
    step (where the NaN check happens). Both runs log and evaluate at step 0 and at their last step only."""
    counts = []
    for steps in (6, 12):
        with host_reads() as calls:
            tiny_run(char_data, tmp_path / f"run{steps}", max_steps=steps, log_interval=1000, eval_interval=1000)
        counts.append(len(calls))
    assert counts[0] > 0, "the counter saw no read at all: it is not counting"
    assert counts[0] == counts[1], calls


def _reference_losses(char_data: Path, tc: TrainConfig) -> list[float]:
    """The same run as a plain torch loop: seeded model, the run's batches, torch's for-loop AdamW (decay on
    matrices and embeddings only), global-norm clipping, constant lr."""
    data = TokenData(char_data)
    mc = TINY.replace(vocab_size=data.vocab_size)
    torch.manual_seed(tc.seed)
    model = Transformer(mc)
    model.init_weights("gpt2")
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=False, fused=False)
    batches = Batches(data.split("train"), mc.context_length, tc.batch_size, 1, tc.seed, "random")
    losses = []
    for step in range(tc.max_steps):
        x, y = batches.get(step, 0, torch.device("cpu"))
        loss = F.cross_entropy(model(x).reshape(-1, mc.vocab_size), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_logged_losses_equal_a_plain_torch_loop(tmp_path, char_data):
    """The device-side loss accumulation logs what a plain loop computes, step by step."""
    import json

    tc = tiny_run(char_data, tmp_path / "run", log_interval=1, schedule="constant", warmup_steps=0, lr=3e-3)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [e["loss"] for e in events if e["event"] == "train"]
    assert logged == pytest.approx(_reference_losses(char_data, tc), abs=1e-4)


def test_a_nan_is_caught_at_the_next_log_step_and_named(tmp_path, char_data):
    """A loss that turns NaN between two log steps still stops the run, naming the step where it first did, and
    keeps the last good checkpoint (step 0: nothing after the NaN was saved)."""
    from lmlab.checkpoint import read_meta
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match=r"training diverged: loss became nan at step (\d+)") as err:
        tiny_run(char_data, tmp_path / "run", optimizer="sgd", lr=1e12, grad_clip=0.0, warmup_steps=0,
                 log_interval=5, eval_interval=1000)
    first_nan = int(err.value.args[0].split("at step ")[1].split(";")[0])
    assert 1 <= first_nan <= 5
    assert read_meta(tmp_path / "run" / "last")["run_state"]["step"] == 0


# ---------------------------------------------------------------------------------------------------------
# The padded vocabulary.

@pytest.mark.parametrize("tie", [True, False])
def test_padded_head_gives_the_plain_heads_logits_and_gradients(tie):
    """65 rows padded to 128 for the matmul: the same logits (B, T, 65) and the same gradients, the head still
    tied to the embedding when the model ties them."""
    import copy

    from lmlab.training.fastpath import PaddedHead, pad_vocab

    torch.manual_seed(0)
    plain = Transformer(TINY.replace(tie_embeddings=tie))
    padded = pad_vocab(copy.deepcopy(plain), 64)
    assert isinstance(padded.lm_head, PaddedHead) and padded.lm_head.pad == 63
    assert (padded.lm_head.weight is padded.wte.weight) == tie
    x = torch.randint(0, 65, (3, 17), generator=torch.Generator().manual_seed(1))
    a, b = plain(x), padded(x)
    assert a.shape == b.shape == (3, 17, 65)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    a.logsumexp(-1).sum().backward()
    b.logsumexp(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), padded.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_training_loss_on_the_padded_head_is_cross_entropy_on_the_true_vocabulary(tie, bf16):
    """The loss the model computes for training (`targets=`, on the padded logits with the padding at -inf) is
    torch's F.cross_entropy of the plain model's 65 logits, value and every gradient, ignored targets (-100)
    included; under bf16 autocast too (to bf16's precision)."""
    import copy

    from lmlab.training.fastpath import pad_vocab

    torch.manual_seed(0)
    plain = Transformer(TINY.replace(tie_embeddings=tie))
    padded = pad_vocab(copy.deepcopy(plain), 64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 65, (3, 17), generator=g), torch.randint(0, 65, (3, 17), generator=g)
    y[0, :5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want = F.cross_entropy(plain(x).float().reshape(-1, 65), y.reshape(-1))
        got = padded(x, targets=y)
        hidden = padded(x, head=False)
        masked = padded.lm_head.masked(hidden)
    assert masked.shape == (3, 17, 128) and torch.isneginf(masked[..., 65:]).all()
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    want.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), padded.parameters(), strict=True):
        assert torch.isfinite(q.grad).all(), name
        torch.testing.assert_close(q.grad, p.grad, **(dict(rtol=5e-2, atol=2e-3) if bf16 else
                                                       dict(rtol=1e-5, atol=1e-6)), msg=name)


def test_padded_training_saves_and_exports_the_unpadded_shapes(tmp_path, char_data):
    """A run with the padded head writes a checkpoint with the keys and shapes of an unpadded run's, and nearly
    its weights; its model exports to an HF directory that transformers reads and runs to the same logits, and to
a GGUF file of the true vocabulary."""
    transformers = pytest.importorskip("transformers")
    import lmlab
    from lmlab.training.fastpath import pad_vocab
    from lmlab.weights.export import export

    for multiple in (1, 64):
        tiny_run(char_data, tmp_path / f"pad{multiple}", max_steps=3, pad_vocab=multiple)
    files = [safe_open(str(tmp_path / f"pad{m}" / "last" / "model.safetensors"), "pt") for m in (1, 64)]
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    for key in files[0].keys():
        a, b = files[0].get_tensor(key), files[1].get_tensor(key)
        assert a.shape == b.shape, key
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)
    lm = lmlab.load(tmp_path / "pad64" / "last", device="cpu")
    model = pad_vocab(lm.model, 64)  # export the padded model itself, as a script holding it would
    out = export(model, lm.tokenizer, tmp_path / "hf", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)
        gguf = lmlab.load(export(model, lm.tokenizer, tmp_path / "m.gguf", "gguf"), device="cpu").model
        assert gguf.lm_head.weight.shape == (model.cfg.vocab_size, model.cfg.d_model)
        torch.testing.assert_close(gguf(x), model(x), rtol=1e-4, atol=1e-4)



# ---------------------------------------------------------------------------------------------------------
# Compiled and bf16 training against the plain path.

def test_compiled_logits_equal_eager():
    """torch.compile (Inductor, on CPU here) of the model in train mode without dropout: eager's logits."""
    torch.manual_seed(0)
    model = Transformer(TINY.replace(family="llama", tie_embeddings=False, n_kv_heads=1)).train()
    x = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_fast_path_training_losses_follow_the_plain_path(tmp_path, char_data):
    """20 steps with every fast-path setting (compiled, bf16 autocast, padded vocabulary) log losses within 0.02
    of the plain float32 run's (bf16 keeps 8 bits of mantissa: about 3 significant digits per op), and end
    having learned as much (final losses within 1%)."""
    import json

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]

    settings = dict(max_steps=20, log_interval=1, lr=3e-3, warmup_steps=5)
    tiny_run(char_data, tmp_path / "plain", **settings, pad_vocab=1)
    tiny_run(char_data, tmp_path / "fast", **settings, pad_vocab=64, compile=True, dtype="bfloat16")
    plain, fast = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    assert len(plain) == len(fast) == 20
    assert fast == pytest.approx(plain, abs=0.02)
    assert fast[-1] == pytest.approx(plain[-1], rel=0.01) and plain[-1] < plain[0] - 0.3


# ---------------------------------------------------------------------------------------------------------
# --fp8: torchao's float8 training, refused where it cannot pay; its arithmetic checked on CPU.

@pytest.mark.parametrize("command", [["train", "--data", "no-data", "--out", "no-run", "--preset", "char-cpu"],
                                     ["bench", "train", "--preset", "char-cpu"]])
def test_fp8_on_a_cpu_is_one_line_and_exit_2(command):
    """Refused before anything is read or built (the data directory here does not even exist)."""
    import subprocess

    from tests.conftest import lmlab_cmd, subprocess_env

    p = subprocess.run(lmlab_cmd(*command, "--fp8", "--device", "cpu"), capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("lmlab: error: --fp8 needs an NVIDIA GPU with FP8")
    assert "compute capability 8.9 or newer" in p.stderr and "device is cpu" in p.stderr


def test_fp8_names_the_gpu_it_needs_on_an_older_one():
    """A100 (8.0) and V100 (7.0) have no FP8 tensor cores; Ada (8.9) and H100/H200 (9.0) do."""
    from lmlab.training.fastpath import fp8_refusal

    cuda = torch.device("cuda")
    why = fp8_refusal(cuda, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert "NVIDIA A100-SXM4-80GB is compute capability 8.0" in why and "8.9 or newer" in why
    assert "7.0" in fp8_refusal(cuda, (7, 0), "Tesla V100")
    assert fp8_refusal(cuda, (8, 9), "NVIDIA L4") is None and fp8_refusal(cuda, (9, 0), "NVIDIA H200") is None


def test_fp8_training_follows_bf16_for_20_steps(char_data):
    """torchao's rowwise float8 layers (the arithmetic `--fp8` runs on a GPU, emulated by torch on CPU) swap in
    for the blocks' linears alone, keep every state-dict key and tensor, and train: 20 AdamW steps under bf16
    autocast stay within 4% of the bf16 run's losses (0.03 apart on average), and both learn."""
    import copy

    pytest.importorskip("torchao")
    from lmlab.training.fastpath import float8_training

    data = TokenData(char_data)
    mc = TINY.replace(vocab_size=data.vocab_size)
    torch.manual_seed(0)
    bf16 = Transformer(mc)
    fp8 = copy.deepcopy(bf16)
    keys = {k: v.clone() for k, v in fp8.state_dict().items()}
    assert float8_training(fp8) == 4 * mc.n_layers  # qkv, proj, up, down; never the head
    assert type(fp8.lm_head) is torch.nn.Linear and type(fp8.blocks[0].attn.qkv).__name__ == "Float8Linear"
    assert fp8.state_dict().keys() == keys.keys()
    batches = Batches(data.split("train"), mc.context_length, 8, 1, 0, "random")
    losses = {}
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for step in range(20):
            x, y = batches.get(step, 0, torch.device("cpu"))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, targets=y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["fp8"] == pytest.approx(losses["bf16"], rel=0.04)  # FP8 e4m3 keeps 3 bits of mantissa
    assert sum(abs(a - b) for a, b in zip(losses["fp8"], losses["bf16"], strict=True)) / 20 < 0.03
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.5 and losses["fp8"][-1] < losses["fp8"][0] - 0.5


# ---------------------------------------------------------------------------------------------------------
# The decoding step: compiled as one graph (CUDA graphs on a GPU) against the plain eager engine.

def _greedy(model: Transformer, prompts: list[list[int]], n: int = 10) -> list[list[int]]:
    from lmlab.infer.generate import SamplingConfig, generate_ids

    steps = list(generate_ids(model, prompts, SamplingConfig(max_new_tokens=n, temperature=0), eos_id=None))
    return [list(row) for row in zip(*steps, strict=True)]


def _decode_models(device: str, dtype: torch.dtype) -> tuple[Transformer, Transformer]:
    import copy

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=97, context_length=64, d_model=64, d_ff=128, n_layers=2, n_heads=4,
                      n_kv_heads=2)
    plain = Transformer(cfg).to(device=device, dtype=dtype).eval()
    return plain, copy.deepcopy(plain)


def _check_graph_decoding(device: str, dtype: torch.dtype) -> None:
    """Three generations (ragged prompts, so left padding and its mask; the second reuses the first's cache with
    its stale entries, the third has another batch size): the same greedy tokens as the plain engine."""
    from lmlab.infer.generate import compile_decoding

    plain, graphed = _decode_models(device, dtype)
    compile_decoding(graphed, mode="reduce-overhead")  # fullgraph: any graph break fails here
    g = torch.Generator().manual_seed(3)
    batches = [[torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
               for lengths in ((5, 9, 2), (7, 3, 8), (6,))]
    for prompts in batches:
        assert _greedy(graphed, prompts) == _greedy(plain, prompts)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_gate_up_gives_the_unfused_models_logits_and_state_dict(bias):
    """A SwiGLU model with gate and up fused into one matmul (what compile_decoding does first): the unfused
    model's logits (float32, 1e-5) and greedy tokens, and the same state-dict keys and tensors, which load back
    into an unfused model."""
    import copy

    from lmlab.fuse import FusedSwiGLU, fuse_gate_up

    plain, _ = _decode_models("cpu", torch.float32)
    if bias:
        cfg = plain.cfg.replace(bias=True)
        torch.manual_seed(1)
        plain = Transformer(cfg).eval()
    fused = copy.deepcopy(plain)
    assert fuse_gate_up(fused) == plain.cfg.n_layers and isinstance(fused.blocks[0].mlp, FusedSwiGLU)
    x = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    prompts = [[5, 9, 2, 7], [3, 1]]
    assert _greedy(fused, prompts) == _greedy(plain, prompts)
    a, b = plain.state_dict(), fused.state_dict()
    assert list(sorted(a)) == list(sorted(b)) and all(torch.equal(a[k], b[k]) for k in a)
    back = copy.deepcopy(plain)
    back.load_state_dict(b)
    fused.load_state_dict(a)  # and an unfused state dict loads into the fused model
    with torch.no_grad():
        torch.testing.assert_close(fused(x), back(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_one_graph_decoding_step_on_cpu_matches_the_plain_engine():
    """The CUDA-graph settings (reduce-overhead, fullgraph) on CPU, where torch skips the graph capture but
    compiles the same single graph with Inductor, and the engine keeps and reuses its cache as on a GPU."""
    _check_graph_decoding("cpu", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_decoding_matches_the_plain_engine():
    _check_graph_decoding("cuda", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# lmlab bench's MFU: the CPU-side pieces (the figure itself needs a GPU).

def test_train_flops_per_token_is_nanogpts_count_for_gpt2_124m():
    """nanoGPT's estimate_mfu for GPT-2 small: 6 N + 12 L H Q T with N = 124,439,808 published parameters less
    the 1024 x 768 position table, L = H = 12, Q = 64, T = 1024."""
    from lmlab.bench import train_flops_per_token
    from lmlab.config import preset

    n = 124_439_808 - 1024 * 768
    assert train_flops_per_token(preset("gpt2-124m"), 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_matmul_peak_and_the_mfu_row():
    """The peak is 2 n^3 over a measured time (positive, and below anything a CPU core can do for n = 128 in
    float32: 1e13 FLOP/s), and a result with an MFU shows it in the table; on CPU bench train reports none."""
    from lmlab.bench import bench_train, format_table, matmul_peak

    peak = matmul_peak(torch.device("cpu"), torch.float32, n=128, repeats=3)
    assert 0 < peak < 1e13
    r = bench_train(config=TINY, batch_size=2, context=16, steps=2, warmup=0, device="cpu")
    assert r["mfu"] is None and r["flops_per_token"] > 0 and "MFU" not in format_table(r)
    r.update(mfu=0.42, matmul_peak_flops=8e14)
    assert "42.0% of 800 TFLOP/s" in format_table(r)
