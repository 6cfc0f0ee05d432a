"""Pretraining: one visible loop (`_train`, read it first), its machinery in small named pieces around it.

    for each step:  set lr and dropout from their schedules -> micro-batches: forward, loss, backward
                    -> clip the global gradient norm -> optimizer step -> log
                    -> every eval_interval: val and train loss on fixed subsets, in eval mode
                       -> save RUN/best on improvement, RUN/last always -> early stop after `patience`

A run directory holds best/ and last/ (our checkpoint format, swapped in crash-safely), metrics.jsonl (one JSON
object per event, see lmlab/training/metrics.py), TensorBoard events when tensorboard is installed, and
running.json while the loop runs (lmlab/training/runs.py). `resume=True` continues from last/ exactly: weights,
optimizer state, RNG state and step are restored, and batches are a pure function of the step, so the continued
run equals the uninterrupted one, even after a SIGKILL at any instant.
Ctrl-C (or SIGTERM) finishes the step in flight, saves last/, and exits; a NaN or inf loss stops the run and
keeps the last good checkpoint.

No step waits for the device except at log, eval and stop steps: each step's loss stays a device tensor until
`Run.check_losses` reads the interval's losses in one copy, which is where a NaN or inf is caught (every save
comes after such a check, so a diverged model is never saved). A GPU thus queues step after step while the host
prepares the next batches.

What a run trains and on what is its job: `Pretrain` (random init, a token directory, whole-model checkpoints), or
lmlab.training.finetune.FineTune (a loaded model, maybe with LoRA layers, instruction examples, adapter-only
checkpoints).
The loop sees only the job's Data (batch, losses) and model, so fine-tuning is this loop, not a second one.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmlab.checkpoint import finish_load, is_checkpoint, read_meta, rng_state, save_checkpoint, set_rng_state
from lmlab.config import ModelConfig, TrainConfig
from lmlab.data.tokens import Batches, TokenData, eval_windows
from lmlab.errors import LmlabError, TrainingDiverged
from lmlab.infer.evaluate import mean_loss
from lmlab.model import Transformer
from lmlab.training.distributed import (
    DistInfo,
    barrier,
    broadcast_flag,
    full_state_dict,
    gather_objects,
    init_distributed,
    load_optimizer_state,
    mean_over_ranks,
    optimizer_state,
    print0,
    shutdown,
    wrap,
)
from lmlab.training.fastpath import check_fp8, float8_training, pad_vocab, vocab_multiple
from lmlab.training.metrics import Metrics
from lmlab.training.optim import Optimizers, build_optimizer, dropout_factor, lr_factor
from lmlab.training.runs import running_marker
from lmlab.utils import current_dir

TRAIN_STATE = "train_state.pt"
# Train settings that may change on --resume; anything else must match the run being resumed.
RESUMABLE_CHANGES = {"max_steps", "max_tokens", "eval_interval", "eval_batches", "patience", "min_delta",
                     "log_interval", "device", "compile", "threads", "eval_batch_size", "eval_train"}
RESUMABLE_CHANGES |= {"pad_vocab"}  # speed settings (lmlab/training/fastpath.py): how fast, not what is computed


@dataclass
class RunState:
    """Everything besides weights and optimizer state that a resumed run needs (saved in lmlab.json)."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    elapsed_s: float = 0.0
    stop_reason: str | None = None


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val: float
    best_step: int
    last_val: float | None
    stop_reason: str
    elapsed_s: float


def train(mc: ModelConfig, tc: TrainConfig, data_dir: str | Path, run_dir: str | Path, resume: bool = False,
          quiet: bool = False) -> TrainResult:
    """Train a model described by `mc` with settings `tc` on a prepared data directory, into `run_dir`."""
    return train_job(Pretrain(Path(data_dir)), mc, tc, run_dir, resume, quiet)


def train_job(job: Pretrain, mc: ModelConfig, tc: TrainConfig, run_dir: str | Path, resume: bool = False,
              quiet: bool = False) -> TrainResult:
    """Run the loop for `job`: pretraining (`Pretrain`), or a fine-tune (lmlab.training.finetune.FineTune, a subclass
    that brings its own data, starting weights and checkpoint contents)."""
    info = init_distributed(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        run = build_run(job, mc, tc, Path(run_dir), resume, info)
        with running_marker(run.run_dir, info.is_main):  # RUN/running.json: the run's status for readers
            result = _train(run, quiet)
        barrier(info)  # leave together: gloo aborts a rank that tears down while its peer still talks
        return result
    finally:
        shutdown(info)


def _train(run: Run, quiet: bool) -> TrainResult:
    """The loop. Everything it calls is a method of `run` (below) or a small helper."""
    state, tc = run.state, run.tc
    progress = Progress(run, quiet)
    run.net.train()
    with StopRequest() as stop, progress:
        if not run.resumed and run.evaluate_and_save(progress):
            run.n_steps = state.step
        pending: list[torch.Tensor] = []  # the losses since the last check, on the device
        while state.step < run.n_steps:
            t0 = time.time()
            lr, rates = run.set_schedules()
            pending.append(run.train_step())
            state.step += 1
            at_log = state.step % tc.log_interval == 0 or state.step == run.n_steps
            at_eval = state.step % tc.eval_interval == 0 or state.step == run.n_steps
            if at_log or at_eval:
                loss = run.check_losses(pending)  # the step's one host sync; raises on a NaN or inf
            state.elapsed_s += time.time() - t0
            if at_log:
                tok_per_s = progress.throughput(state.step)
                run.metrics.log("train", step=state.step, loss=loss, lr=lr, dropout=rates,
                                tokens_seen=state.step * run.tokens_per_step, tok_per_s=round(tok_per_s, 1),
                                elapsed_s=round(state.elapsed_s, 3))
                progress.postfix(loss, lr, tok_per_s)
            progress.update()
            if at_eval and run.evaluate_and_save(progress):
                break
            # Under torchrun the flag is a collective (a sync): ranks agree on it at log and eval steps only.
            if (at_log or at_eval or not run.info.enabled) and broadcast_flag(stop.requested, run.info):
                run.check_losses(pending)
                state.stop_reason = f"interrupted at step {state.step}"
                run.save(run.last_dir, with_train_state=True)
                break
    return run.finish(quiet)


def loss_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: AbstractContextManager) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, logits in float32 whatever the autocast dtype. The model computes
    it (`targets=`), so a compiled model compiles its loss too (lmlab.model.Transformer)."""
    with autocast:
        return net(x, targets=y)


def backward(net: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], tc: TrainConfig,
             autocast: AbstractContextManager, defer_sync: bool = False) -> torch.Tensor:
    """Forward and backward over tc.grad_accum micro-batches, gradients averaged, then clipped to tc.grad_clip:
    the training step's work before its optimizer step (`lmlab bench train` times this very function).
    `defer_sync` (DDP): gradients are all-reduced on the last micro-batch only. Returns this rank's mean loss as
    a 0-dim device tensor (no sync)."""
    total = None
    for micro, (x, y) in enumerate(batches):
        last = micro == tc.grad_accum - 1
        with nullcontext() if last or not defer_sync else net.no_sync():
            loss = loss_of(net, x, y, autocast) / tc.grad_accum
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
    return total


def step_optimizer(opt: Optimizers) -> None:
    """The optimizer step after `backward`, gradients cleared for the next one."""
    opt.step()
    opt.zero_grad()


def total_steps(tc: TrainConfig, tokens_per_step: int) -> int:
    limits = [tc.max_steps] if tc.max_steps else []
    if tc.max_tokens:
        limits.append(math.ceil(tc.max_tokens / tokens_per_step))
    return min(limits)


@dataclass
class Data:
    """The data a run reads: splits, training batches, and the fixed evaluation windows. The loop uses only the
    methods and properties below, which lmlab.training.sft.SFTData has too."""

    tokens: TokenData
    train: np.ndarray
    val: np.ndarray
    batches: Batches
    val_windows: list[np.ndarray]
    train_windows: list[np.ndarray]

    @property
    def tokenizer(self):
        return self.tokens.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    @property
    def tokens_per_batch(self) -> int:
        return self.batches.B * self.batches.T

    def batch(self, step: int, micro: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.get(step, micro, device)

    def losses(self, net: torch.nn.Module, device: torch.device, bf16: bool,
               train: bool = True) -> tuple[float, float | None]:
        """(val loss, train loss) on the fixed evaluation windows; the train loss None without `train`."""
        T = self.batches.T
        return (mean_loss(net, self.val, self.val_windows, T, device, bf16),
                mean_loss(net, self.train, self.train_windows, T, device, bf16) if train else None)

    def describe(self) -> dict:
        """What a checkpoint records about its data (lmlab.json)."""
        return {"data_dir": str(self.tokens.path), "data_vocab_size": self.tokens.vocab_size}


def load_data(mc: ModelConfig, tc: TrainConfig, data_dir: Path, info: DistInfo) -> Data:
    data = TokenData(data_dir)
    T, B = mc.context_length, tc.batch_size
    train_split, val_split = data.split("train"), data.split("val")
    batches = Batches(train_split, T, B, tc.grad_accum, tc.seed, tc.sampling, info.rank, info.world)
    if B * info.world * T > len(train_split):
        raise LmlabError(f"a batch of {B * info.world} x {T} tokens does not fit in the training split "
                         f"({len(train_split)} tokens); lower --batch-size or --context-length")
    size = tc.eval_batch_size or B
    return Data(data, train_split, val_split, batches,
                regroup(eval_windows(val_split, T, B, tc.eval_batches, tc.seed), size),
                regroup(eval_windows(train_split, T, B, tc.eval_batches, tc.seed + 1), size))


def regroup(windows: list[np.ndarray], size: int) -> list[np.ndarray]:
    """The same window starts in batches of `size` (the last one shorter when they do not divide evenly)."""
    flat = np.concatenate(windows)
    return [flat[i:i + size] for i in range(0, len(flat), size)]


def check_resume(meta: dict, mc: ModelConfig, tc: TrainConfig, data: Data, info: DistInfo) -> None:
    """Refuse to resume a run with settings that would make the continuation differ from the original."""
    saved_mc = ModelConfig.from_dict(meta["config"])
    if saved_mc != mc:
        diff = [k for k, v in mc.to_dict().items() if saved_mc.to_dict()[k] != v]
        raise LmlabError(f"cannot resume: the model config differs from the saved run in {', '.join(diff)}; "
                         "pass the same settings as the original run, or train into a new --out")
    # a key a run saved before it existed holds its default (the run trained as the default does)
    saved_tc = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | meta.get("train_config", {})
    diff = [k for k, v in tc.to_dict().items() if k not in RESUMABLE_CHANGES and saved_tc.get(k) != v]
    if diff:
        raise LmlabError(f"cannot resume: {', '.join(diff)} differ from the saved run "
                         f"({', '.join(f'{k}={saved_tc.get(k)!r}' for k in diff)}); only "
                         f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on --resume")
    if meta.get("data_vocab_size") not in (None, data.vocab_size):
        raise LmlabError("cannot resume: the data directory's tokenizer differs from the one the run was trained on")
    world = meta["run_state"].get("world_size", 1)
    if world != info.world:
        raise LmlabError(f"cannot resume: the run was trained by {world} processes and this launch has "
                         f"{info.world}; the batches would differ. Use the same process count")


def check_options(tc: TrainConfig, info: DistInfo) -> None:
    if tc.optimizer == "lbfgs" and info.enabled:
        raise LmlabError("lbfgs is full-batch and single-process; run it without torchrun")
    if tc.optimizer == "muon" and tc.fsdp:
        raise LmlabError("muon needs whole weight matrices; use DDP (drop --fsdp) with muon")
    if tc.fp8:
        check_fp8(info.device, tc.dtype)


def check_fits(mc: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before allocating, a model whose weights in `dtype` (float32 for training) alone exceed this
    machine's memory (training with AdamW needs about four times that: weights, gradients and two moments)."""
    if device.type != "cpu" or not hasattr(os, "sysconf"):
        return
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    need = mc.num_params() * dtype.itemsize
    if need > ram:
        raise LmlabError(f"the model has {mc.num_params():,} parameters: {need / 2**30:.1f} GiB of "
                         f"{str(dtype).removeprefix('torch.')} weights, "
                         f"more than this machine's {ram / 2**30:.1f} GiB of memory (training needs about 4x the "
                         "weights); choose a smaller model (--d-model, --n-layers, --vocab-size via the data)")


def build_model(mc: ModelConfig, tc: TrainConfig, info: DistInfo, last_dir: Path | None) -> Transformer:
    """The initial model (seeded, so every rank starts equal), or one model holding the weights saved in
    `last_dir` (built on the meta device and given them: no random model is made on the way)."""
    torch.manual_seed(tc.seed)
    check_fits(mc, info.device)
    if last_dir is not None:
        with torch.device("meta"):
            model = Transformer(mc)
        finish_load(model, load_file(str(current_dir(last_dir) / "model.safetensors")))
        model.to(info.device)
    else:
        try:
            model = Transformer(mc)
        except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises RuntimeError("... can't allocate")
            if isinstance(e, RuntimeError) and "allocate" not in str(e):
                raise
            raise LmlabError(f"could not allocate the model ({mc.num_params():,} parameters, "
                             f"{mc.num_params() * 4 / 2**30:.1f} GiB of float32 weights); choose a smaller model"
                             ) from None
        model.init_weights(tc.init)
        model.to(info.device)
    torch.manual_seed(tc.seed + info.rank)  # a dropout stream per rank (a resume restores it below)
    return model


class Pretrain:
    """What a pretraining run trains and on what: a model from random init, on a prepared token directory; its
    checkpoints hold every weight. lmlab.training.finetune.FineTune overrides these methods for fine-tuning."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def load_data(self, mc: ModelConfig, tc: TrainConfig, info: DistInfo) -> Data:
        return load_data(mc, tc, self.data_dir, info)

    def model_config(self, mc: ModelConfig, data: Data) -> ModelConfig:
        return mc.replace(vocab_size=data.vocab_size)  # the tokenizer decides the vocabulary

    def check_resume(self, meta: dict, mc: ModelConfig, tc: TrainConfig, data: Data, info: DistInfo) -> None:
        check_resume(meta, mc, tc, data, info)

    def build_model(self, mc: ModelConfig, tc: TrainConfig, info: DistInfo, last_dir: Path | None) -> Transformer:
        return build_model(mc, tc, info, last_dir)

    def checkpoint(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict, str]:
        """(the tensors a checkpoint holds, extra lmlab.json fields, the weights file's name)."""
        return weights, {}, "model.safetensors"


def build_run(job: Pretrain, mc: ModelConfig, tc: TrainConfig, run_dir: Path, resume: bool, info: DistInfo) -> Run:
    """Data, model, wrapping, optimizer, and (with `resume`) everything restored from RUN/last."""
    check_options(tc, info)
    data = job.load_data(mc, tc, info)
    mc = job.model_config(mc, data)
    last_dir = run_dir / "last"
    meta = None
    if resume:
        if not is_checkpoint(last_dir):
            raise LmlabError(f"nothing to resume: {last_dir} holds no checkpoint; start without --resume")
        meta = read_meta(last_dir)
        job.check_resume(meta, mc, tc, data, info)
    elif is_checkpoint(last_dir):  # (a best/ alone is what a kill during the very first save leaves: start over)
        raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    model = job.build_model(mc, tc, info, last_dir if resume else None)
    pad_vocab(model, vocab_multiple(tc.pad_vocab, info.device))  # the same parameters: before wrap and optimizer
    if tc.fp8:
        float8_training(model)  # so are these
    net = wrap(model, info, tc.fsdp)  # FSDP2 swaps in sharded parameters: build the optimizer after it
    opt = build_optimizer(model, tc)
    state = RunState()
    if meta is not None:
        rs = meta["run_state"]
        state = RunState(step=rs["step"], best_val=rs["best_val"], best_step=rs["best_step"],
                         evals_since_best=rs["evals_since_best"], elapsed_s=rs["elapsed_s"])
        blob = torch.load(current_dir(last_dir) / TRAIN_STATE, map_location="cpu", weights_only=True)
        load_optimizer_state(net, opt, blob["optimizer"], info, tc.fsdp)
        set_rng_state(blob["rng"][info.rank], info.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.compile:
        net = torch.compile(net)
    metrics = Metrics(run_dir, info.is_main, state.step if resume else None)
    return Run(mc, tc, info, data, run_dir, model, net, opt, state, metrics, resumed=resume, job=job)


class Run:
    """One training run: what build_run assembled, and the step, evaluate-and-save and save the loop calls."""

    def __init__(self, mc: ModelConfig, tc: TrainConfig, info: DistInfo, data: Data, run_dir: Path,
                 model: Transformer, net: torch.nn.Module, opt: Optimizers, state: RunState, metrics: Metrics,
                 resumed: bool, job: Pretrain) -> None:
        self.mc, self.tc, self.info, self.data, self.run_dir = mc, tc, info, data, run_dir
        self.model, self.net, self.opt, self.state, self.metrics = model, net, opt, state, metrics
        self.resumed, self.job = resumed, job
        self.last_dir, self.best_dir = run_dir / "last", run_dir / "best"
        self.tokens_per_step = data.tokens_per_batch * tc.grad_accum * info.world
        self.n_steps = total_steps(tc, self.tokens_per_step)
        self.autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16"
                         else nullcontext())
        self.base_rates = (mc.dropout_embed, mc.dropout_attn, mc.dropout_resid)
        self.running, self.running_steps = torch.zeros((), device=info.device), 0  # losses since the last eval
        self.train_loss_of = "eval"  # where the last evaluation's train loss came from ("eval" or "running")

    def set_schedules(self) -> tuple[float, list[float]]:
        """Set this step's learning rate and dropout rates; return them for the log."""
        factor = lr_factor(self.state.step, self.tc, self.n_steps)
        self.opt.set_lr_factor(factor)
        rates = [r * dropout_factor(self.state.step, self.tc, self.n_steps) for r in self.base_rates]
        self.model.set_dropout(*rates)
        return self.tc.lr * factor, rates

    def micro_batches(self, step: int) -> torch.Tensor:
        """This step's grad_accum micro-batches through `backward` (DDP all-reduces on the last one only)."""
        info, tc = self.info, self.tc
        batches = (self.data.batch(step, micro, info.device) for micro in range(tc.grad_accum))
        return backward(self.net, batches, tc, self.autocast, defer_sync=info.enabled and not tc.fsdp)

    def train_step(self) -> torch.Tensor:
        """One optimizer step; the loss it was taken on, a device tensor. A NaN loss steps too (checking would
        sync): `check_losses` stops the run before anything is saved from it."""
        if self.tc.optimizer == "lbfgs":
            loss = self.lbfgs_step()
        else:
            loss = self.micro_batches(self.state.step)
            step_optimizer(self.opt)
        self.running += loss.detach()  # on the device: read at the next evaluation only
        self.running_steps += 1
        return loss

    def check_losses(self, pending: list[torch.Tensor]) -> float | None:
        """Read the losses of the steps since the last check (averaged over ranks) in one host copy, emptying
        `pending`; raise the divergence error at the first NaN or inf. Returns the latest loss (None if none)."""
        if not pending:
            return None
        losses = mean_over_ranks(torch.stack(pending), self.info).tolist()
        first = self.state.step - len(losses) + 1  # the step pending[0] was taken at
        pending.clear()
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise self.diverged(loss, first + i)
        return losses[-1]

    def lbfgs_step(self) -> torch.Tensor:
        """L-BFGS re-evaluates loss and gradient several times per step (its line search), always on one fixed
        batch: the batch_size * grad_accum windows of step 0, as grad_accum micro-batches, clipped like any step."""
        def closure() -> torch.Tensor:
            self.opt.zero_grad()
            return self.micro_batches(0)

        return torch.as_tensor(self.opt.step(closure), device=self.info.device)

    def evaluate(self) -> tuple[float, float]:
        """(val loss, train loss) on the data's fixed evaluation sets; with eval_train off, the train loss is the
        mean training loss of the steps since the last evaluation (the fixed train windows where there were none:
        the first evaluation)."""
        running = not self.tc.eval_train and self.running_steps > 0
        val, trn = self.data.losses(self.net, self.info.device, self.tc.dtype == "bfloat16", train=not running)
        if running:
            trn = mean_over_ranks(self.running / self.running_steps, self.info).item()
        self.running.zero_()
        self.running_steps = 0
        self.train_loss_of = "running" if running else "eval"
        return val, trn

    def evaluate_and_save(self, progress: Progress) -> bool:
        """Evaluate, log, save best/ on improvement and last/ always; True when early stopping says stop."""
        state, tc = self.state, self.tc
        val, trn = self.evaluate()
        improved = val < state.best_val - tc.min_delta
        if improved:
            state.best_val, state.best_step, state.evals_since_best = val, state.step, 0
        else:
            state.evals_since_best += 1
        lr = tc.lr * lr_factor(max(0, state.step - 1), tc, self.n_steps)
        self.metrics.log("eval", step=state.step, train_loss=trn, val_loss=val, lr=lr,
                         tokens_seen=state.step * self.tokens_per_step, elapsed_s=round(state.elapsed_s, 3),
                         best_val=state.best_val, **({"train_loss_of": "running"}
                                                     if self.train_loss_of == "running" else {}))
        progress.write(f"step {state.step}: train loss {trn:.4f}, val loss {val:.4f}" + (
            " (best)" if improved else f" (best {state.best_val:.4f} at step {state.best_step})"))
        if improved:
            self.save(self.best_dir, with_train_state=False)
        self.save(self.last_dir, with_train_state=True)
        barrier(self.info)
        if tc.patience and state.evals_since_best >= tc.patience:
            state.stop_reason = (f"early stopping: val loss did not improve by {tc.min_delta} in {tc.patience} "
                                 f"evaluations (best {state.best_val:.4f} at step {state.best_step})")
            return True
        return False

    def save(self, directory: Path, with_train_state: bool) -> None:
        """Write a checkpoint (rank 0 writes; every rank joins the collectives that gather it)."""
        info, tc, state = self.info, self.tc, self.state
        weights = full_state_dict(self.net, info, tc.fsdp)
        rng = gather_objects(rng_state(info.device), info) if with_train_state else None
        opt_state = optimizer_state(self.net, self.opt, info, tc.fsdp) if with_train_state else None
        if not info.is_main:
            return
        files = {}
        if with_train_state:
            buf = io.BytesIO()
            torch.save({"optimizer": opt_state, "rng": rng, "step": state.step}, buf)
            files[TRAIN_STATE] = buf.getvalue()
        weights, job_extra, weights_file = self.job.checkpoint(weights)
        extra = {"train_config": tc.to_dict(), **self.data.describe(), **job_extra,
                 "run_state": {"step": state.step, "best_val": state.best_val, "best_step": state.best_step,
                               "evals_since_best": state.evals_since_best, "elapsed_s": state.elapsed_s,
                               "tokens_seen": state.step * self.tokens_per_step, "world_size": info.world}}
        try:
            save_checkpoint(directory, self.mc, weights, self.data.tokenizer, extra=extra, files=files,
                            weights_file=weights_file)
        except (OSError, SafetensorError) as e:
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise LmlabError(f"could not save the checkpoint to {directory} ({why}); the previous checkpoint there "
                             "is intact. Free some disk space, then --resume") from None

    def diverged(self, loss: float, step: int) -> TrainingDiverged:
        """Log the stop and explain it: the error `check_losses` raises on a NaN or inf loss at `step` (1-based)."""
        self.state.stop_reason = f"loss became {loss} at step {step}"
        self.metrics.log("stop", step=step - 1, reason=self.state.stop_reason)  # the last finite step
        self.metrics.close()
        kept = f"the last good checkpoint is {self.last_dir} (step {read_meta(self.last_dir)['run_state']['step']})" \
            if is_checkpoint(self.last_dir) else "no checkpoint was written yet"
        return TrainingDiverged(f"training diverged: {self.state.stop_reason}; {kept}. Lower --lr, raise "
                                "--warmup-steps, or set --grad-clip")

    def finish(self, quiet: bool) -> TrainResult:
        """Log the stop and sum the run up."""
        state = self.state
        if state.stop_reason is None:
            state.stop_reason = f"finished {self.n_steps} steps"
        self.metrics.log("stop", step=state.step, reason=state.stop_reason, best_val=state.best_val,
                         best_step=state.best_step, elapsed_s=round(state.elapsed_s, 3))
        self.metrics.close()
        evals = [e for e in self.metrics.events() if e["event"] == "eval"]
        if not quiet:
            print0(self.info, f"{state.stop_reason}; best val loss {state.best_val:.4f} at step {state.best_step}; "
                              f"checkpoints in {self.run_dir}/best and {self.run_dir}/last")
        return TrainResult(self.run_dir, state.step, state.best_val, state.best_step,
                           evals[-1]["val_loss"] if evals else None, state.stop_reason, state.elapsed_s)


class Progress:
    """The tqdm bar on rank 0 (none when quiet), and the throughput since the last log line."""

    def __init__(self, run: Run, quiet: bool) -> None:
        self.bar = None
        self.tokens_per_step = run.tokens_per_step
        self.t_last, self.step_last = time.time(), run.state.step
        if not quiet:
            trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            of = f" ({trainable:,} trainable)" if trainable < run.model.num_params() else ""
            print0(run.info, f"training a {run.mc.family} model of {run.model.num_params():,} parameters{of} on "
                             f"{run.info.device} x{run.info.world}: {run.n_steps} steps of {run.tokens_per_step:,} "
                             f"tokens ({run.tc.optimizer}, lr {run.tc.lr}, {run.tc.schedule} schedule)")
            if run.info.is_main:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=run.n_steps, initial=run.state.step, desc="training", unit="step",
                                dynamic_ncols=True, mininterval=0.5)

    def throughput(self, step: int) -> float:
        now = time.time()
        tps = (step - self.step_last) * self.tokens_per_step / max(1e-9, now - self.t_last)
        self.t_last, self.step_last = now, step
        return tps

    def postfix(self, loss: float, lr: float, tok_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:,.0f}")

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


class StopRequest:
    """First Ctrl-C / SIGTERM asks the loop to stop after the step in flight; a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
