"""Pretraining: one visible loop.

    for each step:  set lr and dropout from their schedules -> micro-batches: forward, loss, backward
                    -> clip the global gradient norm -> optimizer step -> log
                    -> every eval_interval: val and train loss on fixed subsets, in eval mode
                       -> save RUN/best on improvement, RUN/last always -> early stop after `patience`

A run directory holds best/ and last/ (our checkpoint format, written atomically), metrics.jsonl (one JSON
object per event), and TensorBoard events when tensorboard is installed. `resume=True` continues from
last/ exactly: weights, optimizer state, RNG state and step are restored, and batches are a pure function
of the step, so the continued run equals the uninterrupted one. Ctrl-C (or SIGTERM) finishes the step in
flight, saves last/, and exits; a NaN or inf loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from lmlab.checkpoint import is_checkpoint, load_model, read_meta, save_checkpoint
from lmlab.config import ModelConfig, TrainConfig
from lmlab.data import Batches, TokenData, eval_windows, windows_to_batch
from lmlab.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_flag,
    full_state_dict,
    gather_objects,
    init_distributed,
    load_optimizer_state,
    optimizer_state,
    print0,
    shutdown,
    wrap,
)
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.optim import build_optimizer, dropout_factor, lr_factor
from lmlab.utils import atomic_write_text

TRAIN_STATE = "train_state.pt"
# Train settings that may change on --resume; anything else must match the run being resumed.
RESUMABLE_CHANGES = {"max_steps", "max_tokens", "eval_interval", "eval_batches", "patience", "min_delta",
                     "log_interval", "device", "compile"}


@dataclass
class RunState:
    """Everything besides weights and optimizer state that a resumed run needs."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    elapsed_s: float = 0.0
    stop_reason: str | None = None
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val: float
    best_step: int
    last_val: float | None
    stop_reason: str
    elapsed_s: float


class Metrics:
    """metrics.jsonl (rank 0 only) and, when tensorboard is installed, TensorBoard scalars."""

    def __init__(self, run_dir: Path, info: DistInfo, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = info.is_main
        self.tb = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():  # drop events the resumed run will redo
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step and json.loads(ln)["event"] != "stop"]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except Exception:  # tensorboard not installed: the JSONL file is the record
            self.tb = None

    def log(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")
        if self.tb is not None and "step" in fields:
            for k, v in fields.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, fields["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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


def _check_resume(meta: dict, mc: ModelConfig, tc: TrainConfig, data: TokenData) -> None:
    saved_mc = ModelConfig.from_dict(meta["config"])
    if saved_mc != mc:
        diff = [k for k, v in mc.to_dict().items() if saved_mc.to_dict()[k] != v]
        raise LmlabError(f"cannot resume: the model config differs from the saved run in {', '.join(diff)}; "
                         "pass the same settings as the original run, or train into a new --out")
    saved_tc = meta.get("train_config", {})
    diff = [k for k, v in tc.to_dict().items() if k not in RESUMABLE_CHANGES and saved_tc.get(k) != v]
    if diff:
        raise LmlabError(f"cannot resume: {', '.join(diff)} differ from the saved run "
                         f"({', '.join(f'{k}={saved_tc.get(k)!r}' for k in diff)}); only "
                         f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on --resume")
    if meta.get("data_vocab_size") not in (None, data.vocab_size):
        raise LmlabError("cannot resume: the data directory's tokenizer differs from the one the run was trained on")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def total_steps(tc: TrainConfig, tokens_per_step: int) -> int:
    limits = [tc.max_steps] if tc.max_steps else []
    if tc.max_tokens:
        limits.append(math.ceil(tc.max_tokens / tokens_per_step))
    return min(limits)


def train(mc: ModelConfig, tc: TrainConfig, data_dir: str | Path, run_dir: str | Path, resume: bool = False,
          quiet: bool = False) -> TrainResult:
    """Train a model described by `mc` with settings `tc` on a prepared data directory, into `run_dir`."""
    info = init_distributed(tc.device)
    try:
        result = _train(mc, tc, Path(data_dir), Path(run_dir), resume, quiet, info)
        barrier(info)  # leave together: gloo aborts a rank that tears down while its peer still talks
        return result
    finally:
        shutdown(info)


def _train(mc: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, quiet: bool,
           info: DistInfo) -> TrainResult:
    data = TokenData(data_dir)
    mc = mc.replace(vocab_size=data.vocab_size) if mc.vocab_size != data.vocab_size else mc
    T, B = mc.context_length, tc.batch_size
    train_split, val_split = data.split("train"), data.split("val")
    batches = Batches(train_split, T, B, tc.grad_accum, tc.seed, tc.sampling, info.rank, info.world)
    if B * info.world * T > len(train_split):
        raise LmlabError(f"a batch of {B * info.world} x {T} tokens does not fit in the training split "
                         f"({len(train_split)} tokens); lower --batch-size or --context-length")
    val_windows = eval_windows(val_split, T, B, tc.eval_batches, tc.seed)
    train_windows = eval_windows(train_split, T, B, tc.eval_batches, tc.seed + 1)
    if tc.optimizer == "lbfgs" and info.enabled:
        raise LmlabError("lbfgs is full-batch and single-process; run it without torchrun")
    if tc.optimizer == "muon" and tc.fsdp:
        raise LmlabError("muon needs whole weight matrices; use DDP (drop --fsdp) with muon")

    last_dir, best_dir = run_dir / "last", run_dir / "best"
    state = RunState()
    if resume:
        if not is_checkpoint(last_dir):
            raise LmlabError(f"nothing to resume: {last_dir} holds no checkpoint; start without --resume")
        meta = read_meta(last_dir)
        _check_resume(meta, mc, tc, data)
    elif is_checkpoint(last_dir) or is_checkpoint(best_dir):
        raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")

    torch.manual_seed(tc.seed)
    model = Transformer(mc)
    model.init_weights(tc.init)
    model.to(info.device)
    torch.manual_seed(tc.seed + info.rank)  # same initial weights everywhere, a dropout stream per rank
    blob = None
    if resume:
        saved, _, meta = load_model(last_dir, info.device, torch.float32)
        model.load_state_dict(saved.state_dict())
        del saved
        rs = meta["run_state"]
        if rs.get("world_size", 1) != info.world:
            raise LmlabError(f"cannot resume: the run was trained by {rs.get('world_size', 1)} processes and this "
                             f"launch has {info.world}; the batches would differ. Use the same process count")
        blob = torch.load(last_dir / TRAIN_STATE, map_location="cpu", weights_only=True)
        state = RunState(step=rs["step"], best_val=rs["best_val"], best_step=rs["best_step"],
                         evals_since_best=rs["evals_since_best"], elapsed_s=rs["elapsed_s"])
    net = wrap(model, info, tc.fsdp)  # FSDP2 swaps in sharded parameters: build the optimizer after it
    opt = build_optimizer(model, tc)
    if blob is not None:
        load_optimizer_state(net, opt, blob["optimizer"], info, tc.fsdp)
        rng = blob["rng"][info.rank]
        _set_rng_state({k: v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v] for k, v in rng.items()})
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.compile:
        net = torch.compile(net)
    metrics = Metrics(run_dir, info, state.step if resume else None)

    tokens_per_step = B * T * tc.grad_accum * info.world
    n_steps = total_steps(tc, tokens_per_step)
    autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16"
                else nullcontext())
    base_rates = (mc.dropout_embed, mc.dropout_attn, mc.dropout_resid)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = net(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    @torch.no_grad()
    def evaluate(split, windows) -> float:
        net.eval()
        losses = [loss_of(*windows_to_batch(split, w, T, info.device)).item() for w in windows]
        net.train()
        return sum(losses) / len(losses)

    def save(directory: Path, with_train_state: bool) -> None:
        weights = full_state_dict(net, info, tc.fsdp)  # collective under FSDP: every rank calls it
        rng = gather_objects(_rng_state(), info) if with_train_state else None  # collective too
        opt_state = optimizer_state(net, opt, info, tc.fsdp) if with_train_state else None  # and this
        if not info.is_main:
            return
        files = {}
        if with_train_state:
            buf = io.BytesIO()
            torch.save({"optimizer": opt_state, "rng": rng, "step": state.step}, buf)
            files[TRAIN_STATE] = buf.getvalue()
        extra = {"train_config": tc.to_dict(), "data_dir": str(data_dir), "data_vocab_size": data.vocab_size,
                 "run_state": {"step": state.step, "best_val": state.best_val, "best_step": state.best_step,
                               "evals_since_best": state.evals_since_best, "elapsed_s": state.elapsed_s,
                               "tokens_seen": state.step * tokens_per_step, "world_size": info.world}}
        try:
            save_checkpoint(directory, mc, weights, data.tokenizer, extra=extra, files=files)
        except (OSError, SafetensorError) as e:
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise LmlabError(f"could not save the checkpoint to {directory} ({why}); the previous checkpoint there "
                             "is intact. Free some disk space, then --resume") from None

    def run_eval() -> bool:
        """Evaluate, log, save best/last; True when early stopping says stop."""
        val = evaluate(val_split, val_windows)
        trn = evaluate(train_split, train_windows)
        improved = val < state.best_val - tc.min_delta
        if improved:
            state.best_val, state.best_step, state.evals_since_best = val, state.step, 0
        else:
            state.evals_since_best += 1
        metrics.log("eval", step=state.step, train_loss=trn, val_loss=val, lr=tc.lr * lr_factor(
            max(0, state.step - 1), tc, n_steps), tokens_seen=state.step * tokens_per_step,
            elapsed_s=round(state.elapsed_s, 3), best_val=state.best_val)
        if bar is not None:
            bar.write(f"step {state.step}: train loss {trn:.4f}, val loss {val:.4f}"
                      + (" (best)" if improved else f" (best {state.best_val:.4f} at step {state.best_step})"))
        if improved:
            save(best_dir, with_train_state=False)
        save(last_dir, with_train_state=True)
        barrier(info)
        if tc.patience and state.evals_since_best >= tc.patience:
            state.stop_reason = (f"early stopping: val loss did not improve by {tc.min_delta} in {tc.patience} "
                                 f"evaluations (best {state.best_val:.4f} at step {state.best_step})")
            return True
        return False

    from tqdm.auto import tqdm

    bar = None
    if info.is_main and not quiet:
        bar = tqdm(total=n_steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
                   mininterval=0.5)
    if not quiet:
        print0(info, f"training a {mc.family} model of {model.num_params():,} parameters on {info.device} "
                     f"x{info.world}: {n_steps} steps of {tokens_per_step:,} tokens ({tc.optimizer}, lr {tc.lr}, "
                     f"{tc.schedule} schedule)")
    lbfgs_batch = batches.get(0, 0, info.device) if tc.optimizer == "lbfgs" else None
    last_val = None
    net.train()
    t_last, tokens_last = time.time(), 0
    try:
        with StopRequest() as stop:
            if state.step == 0 and run_eval():
                n_steps = state.step
            while state.step < n_steps:
                t0 = time.time()
                factor = lr_factor(state.step, tc, n_steps)
                opt.set_lr_factor(factor)
                d = dropout_factor(state.step, tc, n_steps)
                model.set_dropout(*(r * d for r in base_rates))
                if lbfgs_batch is not None:
                    def closure():
                        opt.zero_grad()
                        loss = loss_of(*lbfgs_batch)
                        loss.backward()
                        return loss

                    loss_value = float(opt.step(closure))
                else:
                    loss_sum = 0.0
                    for micro in range(tc.grad_accum):
                        x, y = batches.get(state.step, micro, info.device)
                        sync = micro == tc.grad_accum - 1 or not info.enabled or tc.fsdp
                        with nullcontext() if sync else net.no_sync():
                            loss = loss_of(x, y) / tc.grad_accum
                            loss.backward()
                        loss_sum += loss.item()
                    loss_value = all_reduce_mean(loss_sum, info)
                    if not math.isfinite(loss_value):
                        raise FloatingPointError
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
                    opt.step()
                    opt.zero_grad()
                if not math.isfinite(loss_value):
                    raise FloatingPointError
                state.step += 1
                state.elapsed_s += time.time() - t0
                tokens_last += tokens_per_step
                if state.step % tc.log_interval == 0 or state.step == n_steps:
                    now = time.time()
                    tps = tokens_last / max(1e-9, now - t_last)
                    t_last, tokens_last = now, 0
                    metrics.log("train", step=state.step, loss=loss_value, lr=tc.lr * factor,
                                dropout=[r * d for r in base_rates], tokens_seen=state.step * tokens_per_step,
                                tok_per_s=round(tps, 1), elapsed_s=round(state.elapsed_s, 3))
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{tc.lr * factor:.2e}", tok_s=f"{tps:,.0f}")
                if bar is not None:
                    bar.update(1)
                if state.step % tc.eval_interval == 0 or state.step == n_steps:
                    if run_eval():
                        break
                if broadcast_flag(stop.requested, info):
                    state.stop_reason = f"interrupted at step {state.step}"
                    save(last_dir, with_train_state=True)
                    break
    except FloatingPointError:
        state.stop_reason = f"loss became {loss_value} at step {state.step + 1}"
        metrics.log("stop", step=state.step, reason=state.stop_reason)
        metrics.close()
        if bar is not None:
            bar.close()
        kept = f"the last good checkpoint is {last_dir} (step {read_meta(last_dir)['run_state']['step']})" \
            if is_checkpoint(last_dir) else "no checkpoint was written yet"
        raise LmlabError(f"training diverged: {state.stop_reason}; {kept}. Lower --lr, raise --warmup-steps, "
                         "or set --grad-clip") from None
    finally:
        if bar is not None:
            bar.close()
    if state.stop_reason is None:
        state.stop_reason = f"finished {n_steps} steps"
    metrics.log("stop", step=state.step, reason=state.stop_reason, best_val=state.best_val,
                best_step=state.best_step, elapsed_s=round(state.elapsed_s, 3))
    metrics.close()
    history = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if info.is_main else []
    evals = [e for e in history if e["event"] == "eval"]
    last_val = evals[-1]["val_loss"] if evals else None
    if not quiet:
        print0(info, f"{state.stop_reason}; best val loss {state.best_val:.4f} at step {state.best_step}; "
                     f"checkpoints in {run_dir}/best and {run_dir}/last")
    return TrainResult(run_dir, state.step, state.best_val, state.best_step, last_val, state.stop_reason,
                       state.elapsed_s)
