"""The training loop: learning, metrics, best/last checkpoints, early stopping, exact resume after SIGKILL,
Ctrl-C, divergence, a full disk, bad input, and 2-process gloo DDP against a single process."""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmlab
from lmlab.config import ModelConfig, TrainConfig
from lmlab.errors import LmlabError
from lmlab.training.loop import train
from tests.conftest import lmlab_cmd, subprocess_env

TINY = ModelConfig(family="gpt2", vocab_size=65, context_length=32, d_model=32, n_layers=2, n_heads=2, bias=False)
FLAGS = ["--family", "gpt2", "--context-length", "32", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
         "--bias", "false", "--batch-size", "4", "--seed", "3", "--eval-batches", "2", "--device", "cpu", "--quiet"]


# --standalone: torchrun's own rendezvous on a free port, so tests never collide on a fixed one.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _child_errors(stderr: str) -> str:
    """What the workers said, without torchrun's summary banner."""
    return "\n".join(ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("E1", "W1", "I1")))[:6000]


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_training_learns_and_writes_a_run(tmp_path, char_data):
    run = tmp_path / "run"
    result = train(TINY, TrainConfig(max_steps=60, eval_interval=20, eval_batches=4, batch_size=8, lr=3e-3,
                                     warmup_steps=5, device="cpu"), char_data, run, quiet=True)
    evals = events(run, "eval")
    assert [e["step"] for e in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    for key in ("step", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s"):
        assert key in evals[-1]
    assert evals[-1]["tokens_seen"] == 60 * 8 * 32
    assert events(run, "stop")[-1]["reason"] == "finished 60 steps" == result.stop_reason
    lm = lmlab.load(run, device="cpu")  # loads best/
    assert lm.source.endswith("best") and lm.meta["run_state"]["step"] == result.best_step
    ids = lm.tokenizer.encode("Fir")
    with torch.no_grad():  # greedy decoding by hand: the full forward each step, no cache, no engine
        for _ in range(10):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    assert lm.generate("Fir", max_new_tokens=10, temperature=0) == lm.tokenizer.decode(ids[3:])


def test_larger_evaluation_batches_score_the_same_windows(tmp_path, char_data):
    """eval_batch_size regroups the eval_batches x batch_size fixed windows into fewer, larger passes: every
    evaluation's val and train loss is the default grouping's, to float rounding, and training is unchanged."""
    tc = TrainConfig(max_steps=6, eval_interval=3, eval_batches=6, batch_size=4, device="cpu", seed=3)
    for name, size in (("small", 0), ("large", 12), ("ragged", 7)):
        train(TINY, dataclasses.replace(tc, eval_batch_size=size), char_data, tmp_path / name, quiet=True)
    want = events(tmp_path / "small", "eval")
    assert [e["step"] for e in want] == [0, 3, 6]
    for name in ("large", "ragged"):
        got = events(tmp_path / name, "eval")
        for key in ("val_loss", "train_loss"):
            assert [e[key] for e in got] == pytest.approx([e[key] for e in want], rel=1e-6), (name, key)
        assert [e["loss"] for e in events(tmp_path / name, "train")] == [e["loss"] for e in events(tmp_path / "small",
                                                                                                    "train")]


def test_the_running_train_loss_is_the_mean_of_the_steps_since_the_last_evaluation(tmp_path, char_data):
    """eval_train off: an evaluation's train loss is the mean of the training losses logged since the previous
    one (no pass over the fixed train windows), marked as such; the first evaluation, before any step, scores the
    fixed windows as usual."""
    run = tmp_path / "run"
    tc = TrainConfig(max_steps=8, eval_interval=4, eval_batches=2, batch_size=4, log_interval=1, device="cpu",
                     seed=3, eval_train=False)
    train(TINY, tc, char_data, run, quiet=True)
    evals, steps = events(run, "eval"), [e["loss"] for e in events(run, "train")]
    assert [e["step"] for e in evals] == [0, 4, 8] and len(steps) == 8
    assert "train_loss_of" not in evals[0]
    train(TINY, dataclasses.replace(tc, eval_train=True), char_data, tmp_path / "eval", quiet=True)
    assert evals[0]["train_loss"] == events(tmp_path / "eval", "eval")[0]["train_loss"]
    for e, since in zip(evals[1:], (steps[:4], steps[4:]), strict=True):
        assert e["train_loss_of"] == "running"
        assert e["train_loss"] == pytest.approx(sum(since) / 4, rel=1e-6)


def test_resume_builds_one_model_and_draws_no_random_weights(tmp_path, char_data, monkeypatch):
    """--resume builds the model once, on the meta device, and gives it RUN/last's weights: no random init to
    overwrite, no second model to copy from."""
    from lmlab.model import Transformer

    run = tmp_path / "run"
    tc = TrainConfig(max_steps=4, eval_interval=2, eval_batches=1, batch_size=4, device="cpu", seed=3)
    train(TINY, tc, char_data, run, quiet=True)
    built, inits = [], []
    real_init, real_weights = Transformer.__init__, Transformer.init_weights

    def counting_init(self, cfg):
        real_init(self, cfg)
        built.append(self.wte.weight.device.type)

    monkeypatch.setattr(Transformer, "__init__", counting_init)
    monkeypatch.setattr(Transformer, "init_weights", lambda self, *a: inits.append(1) or real_weights(self, *a))
    train(TINY, dataclasses.replace(tc, max_steps=6), char_data, run, resume=True, quiet=True)
    assert built == ["meta"] and inits == []
    assert events(run, "stop")[-1]["reason"] == "finished 6 steps"


def test_dropout_schedule_reaches_the_model(tmp_path, char_data):
    run = tmp_path / "run"
    train(TINY.replace(dropout=0.2), TrainConfig(max_steps=40, eval_interval=40, log_interval=5, eval_batches=1,
                                                 dropout_schedule="early", dropout_until=0.5, device="cpu"),
          char_data, run, quiet=True)
    logged = {e["step"]: e["dropout"] for e in events(run, "train")}
    assert logged[5] == [0.2, 0.2, 0.2] and logged[20] == [0.2, 0.2, 0.2]  # step 19 < 0.5 * 40
    assert logged[25] == [0.0, 0.0, 0.0] and logged[40] == [0.0, 0.0, 0.0]


def test_bfloat16_autocast_trains(tmp_path, char_data):
    run = tmp_path / "run"
    train(TINY, TrainConfig(max_steps=30, eval_interval=30, eval_batches=2, batch_size=8, lr=3e-3, warmup_steps=2,
                            dtype="bfloat16", device="cpu"), char_data, run, quiet=True)
    evals = events(run, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert load_file(str(run / "last" / "model.safetensors"))["wte.weight"].dtype == torch.float32  # master weights


def test_max_tokens_ends_training(tmp_path, char_data):
    r = train(TINY, TrainConfig(max_steps=0, max_tokens=10 * 4 * 32, batch_size=4, eval_interval=100,
                                eval_batches=1, device="cpu"), char_data, tmp_path / "run", quiet=True)
    assert r.step == 10


def test_early_stopping_on_a_plateau(tmp_path, char_data):
    """With a vanishing learning rate the val loss cannot improve by min_delta: stop after `patience` evals."""
    run = tmp_path / "run"
    r = train(TINY, TrainConfig(max_steps=200, lr=1e-9, min_lr=1e-10, eval_interval=5, patience=3, min_delta=0.01,
                                eval_batches=2, device="cpu"), char_data, run, quiet=True)
    assert r.step == 15 and r.best_step == 0
    assert "early stopping" in r.stop_reason and "early stopping" in events(run, "stop")[-1]["reason"]


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, char_data):
    """Kill a training process mid-run with SIGKILL, resume it, and compare with an uninterrupted run:
    identical float32 weights and losses (dropout on, so the RNG state must be restored too)."""
    args = [*FLAGS, "--data", str(char_data), "--max-steps", "60", "--eval-interval", "10", "--dropout", "0.1",
            "--log-interval", "1"]
    full = tmp_path / "full"
    subprocess.run(lmlab_cmd("train", *args, "--out", str(full)), check=True, env=subprocess_env())

    run = tmp_path / "killed"
    proc = subprocess.Popen(lmlab_cmd("train", *args, "--out", str(run)), env=subprocess_env())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads((run / "last" / "lmlab.json").read_text())["run_state"]["step"] >= 30:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((run / "last" / "lmlab.json").read_text())["run_state"]["step"]
    assert 30 <= killed_at < 60, "the run should have been killed mid-way"
    subprocess.run(lmlab_cmd("train", *args, "--out", str(run), "--resume"), check=True, env=subprocess_env())

    a, b = weights(full / "last"), weights(run / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["val_loss"] for e in events(full, "eval")] == [e["val_loss"] for e in events(run, "eval")]
    assert [e["loss"] for e in events(full, "train")] == [e["loss"] for e in events(run, "train")]


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, char_data):
    run = tmp_path / "run"
    proc = subprocess.Popen(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(run), "--max-steps",
                                      "100000", "--eval-interval", "100000"),
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.time() + 60
    while not (run / "last").exists() and time.time() < deadline:  # the step-0 checkpoint
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err + out
    state = json.loads((run / "last" / "lmlab.json").read_text())["run_state"]
    assert state["step"] > 0 and "interrupted" in events(run, "stop")[-1]["reason"]
    r = subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(run), "--max-steps",
                                 str(state["step"] + 5), "--eval-interval", "100000", "--resume"),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "last" / "lmlab.json").read_text())["run_state"]["step"] == state["step"] + 5


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, char_data):
    run = tmp_path / "run"
    r = subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(run), "--optimizer", "sgd",
                                 "--lr", "1e12", "--grad-clip", "0", "--warmup-steps", "0", "--max-steps", "50"),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training diverged" in r.stderr and "last good checkpoint" in r.stderr
    assert lmlab.load(run / "last", device="cpu").meta["run_state"]["step"] == 0  # the step-0 save survives


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, char_data):
    run = tmp_path / "run"
    args = [*FLAGS, "--data", str(char_data), "--out", str(run), "--eval-interval", "5"]
    subprocess.run(lmlab_cmd("train", *args, "--max-steps", "5"), check=True, env=subprocess_env())
    before = weights(run / "last")
    r = subprocess.run(lmlab_cmd("train", *args, "--max-steps", "10", "--resume"), capture_output=True, text=True,
                       env=subprocess_env(), preexec_fn=_limit_file_size)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "could not save the checkpoint" in r.stderr and r.stderr.count("\n") == 1
    after = lmlab.load(run / "last", device="cpu")
    assert after.meta["run_state"]["step"] == 5
    assert all(torch.equal(before[k], weights(run / "last")[k]) for k in before)
    assert not [p for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("extra, match", [
    (["--optimizer", "adamz"], "unknown optimizer"), (["--schedule", "cosin"], "unknown schedule"),
    (["--init", "xavir"], "unknown init"), (["--preset", "char-cpuu"], "unknown preset"),
    (["--lr", "-0.001"], "lr must be"), (["--dropout", "1.0"], "dropout must be a rate"),
    (["--dropout-attn", "-0.1"], "dropout_attn must be a rate"), (["--batch-size", "5000"], "does not fit"),
    (["--lrr", "0.1"], "did you mean '--lr'"), (["--max-steps", "ten"], "invalid int value"),
    (["--threads", "-1"], "threads must be"),
])
def test_bad_train_input(tmp_path, char_data, extra, match):
    r = subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(tmp_path / "r"),
                                 "--max-steps", "2", *extra), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("lmlab: error:") and r.stderr.count("\n") == 1 and match in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_missing_empty_and_too_short_data(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("just a few words\n")
    subprocess.run(lmlab_cmd("prepare", str(tmp_path / "short.txt"), "--out", str(tmp_path / "short"), "--quiet"),
                   check=True, env=subprocess_env())
    for data, match in ((tmp_path / "nope", "not found"), (tmp_path / "empty", "no meta.json"),
                        (tmp_path / "short", "shorter than one context window")):
        r = subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(data), "--out", str(tmp_path / "r")),
                           capture_output=True, text=True, env=subprocess_env())
        assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_resume_with_an_incompatible_config(tmp_path, char_data):
    run = tmp_path / "run"
    args = [*FLAGS, "--data", str(char_data), "--out", str(run), "--max-steps", "4", "--eval-interval", "2"]
    subprocess.run(lmlab_cmd("train", *args), check=True, env=subprocess_env())
    before = weights(run / "last")
    for extra, match in ((["--d-model", "64"], "model config differs"), (["--optimizer", "sgd"], "optimizer"),
                         ([], "already holds a run")):
        flags = [*args, *extra] + (["--resume"] if extra else [])
        r = subprocess.run(lmlab_cmd("train", *flags), capture_output=True, text=True, env=subprocess_env())
        assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert all(torch.equal(before[k], weights(run / "last")[k]) for k in before)


def test_resume_alone_takes_the_runs_own_settings(tmp_path, char_data):
    run = tmp_path / "run"
    subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(run), "--max-steps", "4",
                             "--eval-interval", "2", "--lr", "0.003"), check=True, env=subprocess_env())
    r = subprocess.run(lmlab_cmd("train", "--data", str(char_data), "--out", str(run), "--resume", "--max-steps", "6",
                                 "--quiet"), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    meta = json.loads((run / "last" / "lmlab.json").read_text())
    assert meta["run_state"]["step"] == 6 and meta["train_config"]["lr"] == 0.003
    assert meta["config"]["d_model"] == 32 and meta["train_config"]["max_steps"] == 6


def test_train_from_config_file(tmp_path, char_data):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"d_ff": 48, "max_steps": 3, "lr": 0.002, "eval_interval": 3}))
    run = tmp_path / "run"
    subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(run), "--config", str(cfg),
                             "--lr", "0.004"), check=True, env=subprocess_env())
    meta = json.loads((run / "last" / "lmlab.json").read_text())
    assert meta["config"]["d_ff"] == 48 and meta["train_config"]["lr"] == 0.004  # flags beat the file
    cfg.write_text(json.dumps({"n_layer": 1}))
    r = subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(tmp_path / "r2"),
                                 "--config", str(cfg)), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and "did you mean 'n_layers'" in r.stderr


def test_eval_and_plot_commands(tmp_path, corpus_file):
    """`lmlab eval` against plain torch cross-entropy on the model's logits, and against the run's own logged val
    loss: with a val split of exactly context + 1 tokens, the training loop's eval windows (random starts in
    [0, len - context)) are all the one window eval scores, so the two losses are of the same 32 targets."""
    from lmlab.data.tokens import TokenData, prepare

    data, run = tmp_path / "data", tmp_path / "run"
    n = len(corpus_file.read_text())
    prepare([str(corpus_file)], data, val_fraction=32.5 / n, quiet=True)
    val = TokenData(data).split("val")
    assert len(val) == 33
    subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(data), "--out", str(run), "--max-steps", "6",
                             "--eval-interval", "3"), check=True, env=subprocess_env())
    r = subprocess.run(lmlab_cmd("eval", "--model", str(run / "last"), "--data", str(data), "--context", "32",
                                 "--device", "cpu"), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    loss, ppl = float(r.stdout.split()[1]), float(r.stdout.split()[3])
    lm = lmlab.load(run / "last", device="cpu")
    x = torch.as_tensor(val[:-1].astype("int64"))[None]
    y = torch.as_tensor(val[1:].astype("int64"))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(lm.model(x)[0], y).item()
    assert loss == pytest.approx(expected, abs=6e-5)
    logged = events(run, "eval")[-1]
    assert logged["step"] == 6 and loss == pytest.approx(logged["val_loss"], abs=6e-5)
    assert ppl == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-3)
    png = tmp_path / "curves.png"
    r = subprocess.run(lmlab_cmd("plot", str(run), str(run), "--out", str(png)), capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_two_processes_match_one(tmp_path, char_data, mode):
    """2-process gloo DDP (or FSDP2) with batch 4 per rank equals one process with batch 8: the same global batch."""
    common = [*[f for f in FLAGS if f != "4"], "--data", str(char_data), "--max-steps", "8", "--eval-interval", "8",
              "--dropout", "0.0", *(["--fsdp"] if mode == "fsdp" else [])]
    common = [f for f in common if f != "--batch-size"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run(lmlab_cmd("train", *common, "--batch-size", "8", "--out", str(single)), check=True,
                   env=subprocess_env())
    r = subprocess.run([*TORCHRUN, "-m", "lmlab", "train", *common, "--batch-size", "4", "--out", str(ddp)],
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, _child_errors(r.stderr)
    a, b = weights(single / "last"), weights(ddp / "last")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    la = [e["loss"] for e in events(single, "train")]
    lb = [e["loss"] for e in events(ddp, "train")]
    # FSDP reduce-scatters gradients in another summation order; Adam magnifies the last-bit differences of
    # near-zero gradients, so its loss agrees a little less tightly than DDP's.
    assert la == pytest.approx(lb, abs=1e-4 if mode == "ddp" else 2e-3)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_resume_under_torchrun(tmp_path, char_data, mode):
    """Stop a 2-process run at step 4, resume it under torchrun to step 8: the same weights as 8 straight steps."""
    common = [*FLAGS, "--data", str(char_data), "--eval-interval", "4", "--dropout", "0.1",
              *(["--fsdp"] if mode == "fsdp" else [])]
    launch = [*TORCHRUN, "-m", "lmlab", "train", *common]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for cmd in ([*launch, "--max-steps", "8", "--out", str(straight)],
                [*launch, "--max-steps", "4", "--out", str(resumed)],
                [*launch, "--max-steps", "8", "--out", str(resumed), "--resume"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
        assert r.returncode == 0, _child_errors(r.stderr)
    a, b = weights(straight / "last"), weights(resumed / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_events_when_installed(tmp_path, char_data):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(TINY, TrainConfig(max_steps=4, eval_interval=2, eval_batches=1, log_interval=1, device="cpu"), char_data,
          run, quiet=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    val = [e.value for e in acc.Scalars("eval/val_loss")]
    assert len(val) == 3 and val == pytest.approx([e["val_loss"] for e in events(run, "eval")])


def test_lmlab_load_rejects_garbage(tmp_path):
    (tmp_path / "lmlab.json").write_text("{not json")
    with pytest.raises(LmlabError, match="not valid JSON"):
        lmlab.load(tmp_path)


def test_lbfgs_optimizes_every_micro_batch_of_its_fixed_batch_and_clips(tmp_path, char_data):
    """lbfgs with grad_accum 2 and clipping equals torch.optim.LBFGS run by hand on the 2 x 4 windows of step 0
    (their mean loss, gradients clipped to norm 0.05 in every closure call). The reference sums the two halves'
    losses as the loop does: L-BFGS's line search turns a last-bit difference in how the mean is summed into
    0.06 of a weight after two steps on some corpora (seen on tinyshakespeare on an AVX-512 CPU)."""
    from lmlab.data.tokens import Batches, TokenData
    from lmlab.model import Transformer

    tc = TrainConfig(optimizer="lbfgs", lr=0.5, batch_size=4, grad_accum=2, grad_clip=0.05, max_steps=2,
                     eval_interval=2, eval_batches=1, warmup_steps=0, schedule="constant", device="cpu", seed=3)
    run = tmp_path / "run"
    train(TINY, tc, char_data, run, quiet=True)

    data = TokenData(char_data)
    batches = Batches(data.split("train"), 32, 4, 2, tc.seed, tc.sampling)
    micro = [batches.get(0, m, torch.device("cpu")) for m in range(2)]  # 2 x ((4, 32), (4, 32))
    torch.manual_seed(tc.seed)
    model = Transformer(TINY.replace(vocab_size=data.vocab_size))
    model.init_weights(tc.init)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=20, line_search_fn="strong_wolfe")

    def closure():  # the mean loss of the 8 windows, as two halves' losses / 2 (the same sum of the same terms)
        opt.zero_grad()
        loss = 0.0
        for x, y in micro:
            half = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) / 2
            half.backward()
            loss += half.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        return loss

    for _ in range(2):
        opt.step(closure)
    got, want = weights(run / "last"), model.state_dict()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-4
    assert max((got[k] - initial[k]).abs().max().item() for k in got) > 1e-2  # the steps really moved the weights


def test_rng_state_holds_the_processs_own_device_and_reads_the_old_format():
    """A checkpoint holds the CPU generator and the process's own device generator, never every visible GPU; the
    older format (a list of every GPU's state, by position) still restores the right entry on a smaller box."""
    from lmlab.checkpoint import device_rng_state, rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch", "device"} and state["device"] == "cpu"
    torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    a = torch.rand(5)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(a, torch.rand(5))

    gpus = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # an 8-GPU box's saved states
    old = {"torch": state["torch"], "cuda": gpus}
    assert device_rng_state(old, torch.device("cuda", 1)) is gpus[1]  # rank on cuda:1 of a 2-GPU box
    assert device_rng_state(old, torch.device("cuda", 0)) is gpus[0]
    assert device_rng_state({"torch": state["torch"], "cuda": gpus[:1]}, torch.device("cuda", 3)) is None
    assert device_rng_state(old, torch.device("cpu")) is None
    new = {"torch": state["torch"], "device": "cuda", "device_rng": gpus[5]}  # saved by a rank on cuda:5
    assert device_rng_state(new, torch.device("cuda", 0)) is gpus[5]  # resumed on a 1-GPU box
    assert device_rng_state(new, torch.device("mps")) is None
    assert device_rng_state({**new, "device": "mps"}, torch.device("mps")) is gpus[5]


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_by_plot(tmp_path, char_data):
    """A kill mid-append leaves half a JSON line at the end of metrics.jsonl: --resume and plot drop it; a damaged
    line elsewhere is still an error."""
    from lmlab.training.plot import read_evals

    run = tmp_path / "run"
    args = [*FLAGS, "--data", str(char_data), "--out", str(run), "--eval-interval", "2"]
    subprocess.run(lmlab_cmd("train", *args, "--max-steps", "2"), check=True, env=subprocess_env())
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"event": "train", "step": 3, "lo')
    assert [e["step"] for e in read_evals(run)] == [0, 2]
    r = subprocess.run(lmlab_cmd("train", *args, "--max-steps", "4", "--resume"), capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [e["step"] for e in read_evals(run)] == [0, 2, 4]
    assert all(json.loads(ln) for ln in metrics.read_text().splitlines())  # no torn line left behind
    metrics.write_text('{"event": "eval", "st\n' + metrics.read_text())
    with pytest.raises(LmlabError, match="line 1 is not a JSON event"):
        read_evals(run)


def test_every_reader_finds_the_previous_checkpoint_in_every_window_of_a_swap(tmp_path, char_data):
    """The states a kill can leave during a checkpoint swap, made by hand: a half-built temporary directory, the
    old version set aside with the new one not yet renamed in, a half-deleted set-aside copy. In each, every
    reader finds a complete checkpoint, and --resume continues to the same weights as a run never interrupted."""
    from lmlab.checkpoint import is_checkpoint, load_model, read_meta, resolve_checkpoint

    args = [*FLAGS, "--data", str(char_data), "--eval-interval", "2"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    subprocess.run(lmlab_cmd("train", *args, "--out", str(straight), "--max-steps", "4"), check=True,
                   env=subprocess_env())
    subprocess.run(lmlab_cmd("train", *args, "--out", str(run), "--max-steps", "2"), check=True, env=subprocess_env())
    before = weights(run / "last")
    half = run / ".last.abcd1234.tmp"  # a kill while the next save was being written
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    for d in ("best", "last"):  # a kill between the two renames of the swap
        (run / d).rename(run / f".{d}.old")
    assert is_checkpoint(run / "last") and not (run / "last").exists()
    assert read_meta(run / "last")["run_state"]["step"] == 2
    assert resolve_checkpoint(run) == run / ".best.old"
    model, _, _ = load_model(run / "last", torch.device("cpu"), torch.float32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert lmlab.load(run, device="cpu").meta["run_state"]["step"] == 2
    r = subprocess.run(lmlab_cmd("train", *args, "--out", str(run), "--max-steps", "4", "--resume"),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    a, b = weights(straight / "last"), weights(run / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # recovered, cleaned up

    (run / ".last.old").mkdir()  # a kill while deleting the set-aside copy after a swap: readers ignore it
    (run / ".last.old" / "lmlab.json").write_text("{")
    assert read_meta(run / "last")["run_state"]["step"] == 4


def test_checkpoints_honour_the_umask(tmp_path):
    """Files and directories of a checkpoint get the umask's modes (mkstemp/mkdtemp alone would give 0600/0700)."""
    import os

    from lmlab.checkpoint import save_model
    from lmlab.model import Transformer

    model = Transformer(TINY)
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        old = os.umask(mask)
        try:
            path = save_model(tmp_path / f"ck{mask:o}", model, None)
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == dir_mode
        assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == {
            "model.safetensors": file_mode, "lmlab.json": file_mode}


def test_a_model_larger_than_memory_is_refused_before_allocating(tmp_path, char_data):
    """Found by the CLI fuzz test: d_model 2**20 was a RuntimeError from torch's allocator (13 TB asked)."""
    r = subprocess.run(lmlab_cmd("train", *FLAGS, "--data", str(char_data), "--out", str(tmp_path / "r"),
                                 "--d-model", str(2**20), "--n-heads", "1"),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("lmlab: error: the model has ") and "GiB" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_fused_adamw_steps_like_torchs_reference_loop():
    """build_optimizer takes torch's fused AdamW on CPU (one kernel per group, for speed); five steps of it must
    land where torch's plain for-loop AdamW (foreach=False, fused=False) does, from the same start and gradients."""
    from lmlab.model import Transformer
    from lmlab.training.optim import build_optimizer

    tc = TrainConfig(lr=3e-3, weight_decay=0.1, beta2=0.99)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Transformer(TINY))
    ours = build_optimizer(models[0], tc)
    assert all(opt.defaults["fused"] for opt in ours.optimizers)
    reference = torch.optim.AdamW([{"params": [p for p in models[1].parameters() if p.dim() >= 2],
                                    "weight_decay": 0.1},
                                   {"params": [p for p in models[1].parameters() if p.dim() < 2],
                                    "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.99), eps=1e-8, foreach=False, fused=False)
    x = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
    for opt, model in ((ours, models[0]), (reference, models[1])):
        for _ in range(5):
            torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 65), x[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_threads_sets_torchs_cpu_thread_count(tmp_path, char_data):
    """--threads reaches torch: a process started with one thread (OMP_NUM_THREADS=1) trains with two."""
    code = (f"import torch; from lmlab.config import TrainConfig; from lmlab.training.loop import train; "
            f"from tests.test_train import TINY; "
            f"train(TINY, TrainConfig(max_steps=2, eval_batches=1, batch_size=2, threads=2, device='cpu'), "
            f"{str(char_data)!r}, {str(tmp_path / 'run')!r}, quiet=True); print(torch.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2"]
