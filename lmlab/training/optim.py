"""Optimizers by name from torch.optim, learning-rate schedules and dropout schedules.

The toolbox of Goodfellow, Bengio & Courville, "Deep Learning", ch. 8: minibatch SGD (8.3.1), momentum
(8.3.2), Nesterov momentum (8.3.3), AdaGrad (8.5.1), RMSProp (8.5.2), Adam (8.5.3), L-BFGS (8.6.2); plus
AdamW (Loshchilov & Hutter 2019) and Muon (Jordan et al. 2024; torch.optim.Muon), which orthogonalizes the
momentum of 2-D hidden weight matrices while AdamW handles embeddings, head, norms and biases.

Weight decay applies to matrices and embeddings (p.dim() >= 2) only, never to biases or norm gains.
Schedules are pure functions of the step, so resuming needs no scheduler state: the loop sets each
group's lr to `base_lr * lr_factor(step)` before every step (as nanoGPT does).
"""

from __future__ import annotations

import math

import torch
from torch.optim._muon import _adjust_lr

from lmlab.config import TrainConfig


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in float32 on CPU, batched over same-shaped matrices.

    torch runs the iteration in bfloat16, which suits GPUs; a CPU without bf16 matrix units (AVX2, most
    AVX-512) emulates it, 28x slower than float32 for a 512 x 128 gradient (66.6 vs 2.4 ms here), which made
    a Muon step ten times an AdamW step. One batched iteration per shape (the blocks' matrices come in four)
    instead of one per matrix took char-cpu's Muon step from 26 to 19 ms at 2 threads. Everything else is
    torch's: its state, hyperparameters and lr rule.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((p.shape, p.device), []).append(i)
            for (_, device), idx in by_shape.items():
                for i in idx:
                    bufs[i].lerp_(grads[i], 1 - group["momentum"])
                momenta = [grads[i].lerp(bufs[i], group["momentum"]) if group["nesterov"] else bufs[i] for i in idx]
                dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
                updates = orthogonalize(torch.stack(momenta), group["ns_coefficients"], group["ns_steps"],
                                        group["eps"], dtype)
                for i, update in zip(idx, updates, strict=True):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def orthogonalize(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Jordan et al.) on a stack of matrices
    (k, m, n), in `dtype`: about U V^T of each g = U S V^T, taken on the wide orientation so the Gram
    matrix is the small one."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Optimizers:
    """One or more torch optimizers stepped together (Muon + AdamW), with one state dict. Each group keeps the
    configured lr as `base_lr`; set_lr_factor sets lr = base_lr * factor."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, closure=None):
        loss = None
        for opt in self.optimizers:
            loss = opt.step(closure) if closure is not None else opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(states)} optimizers, this run has {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(s)
            # torch restores each group's saved keys, base_lr among them (equal to this run's lr: --resume refuses a
            # changed lr); a state saved without it takes the restored lr.
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and embeddings decay; biases and norm gains do not."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_fused(model: torch.nn.Module) -> bool | None:
    """True (torch's one-kernel-per-group Adam/AdamW) where every parameter is a plain CPU or CUDA tensor. On CPU
    torch otherwise runs a Python loop of ~10 small ops per parameter, 1/6 of a char-cpu step on 2 threads
    (benchmarks/char_cpu.md); None (torch's choice) for sharded (DTensor) or other devices' parameters."""
    params = list(model.parameters())
    ok = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok and params else None


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> Optimizers:
    name, lr = tc.optimizer, tc.lr
    groups = param_groups(model, tc.weight_decay)
    opt = torch.optim
    if name == "sgd":
        return Optimizers([opt.SGD(groups, lr=lr)])
    if name == "momentum":
        return Optimizers([opt.SGD(groups, lr=lr, momentum=tc.momentum)])
    if name == "nesterov":
        return Optimizers([opt.SGD(groups, lr=lr, momentum=tc.momentum, nesterov=True)])
    if name == "adagrad":
        return Optimizers([opt.Adagrad(groups, lr=lr, eps=tc.eps)])
    if name == "rmsprop":
        return Optimizers([opt.RMSprop(groups, lr=lr, alpha=tc.beta2, eps=tc.eps)])
    if name == "adam":  # Adam's weight_decay is an L2 term in the gradient, as the original paper has it
        return Optimizers([opt.Adam(groups, lr=lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=use_fused(model))])
    if name == "adamw":
        return Optimizers([opt.AdamW(groups, lr=lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=use_fused(model))])
    if name == "lbfgs":  # one fixed batch (train.py's lbfgs_step), small models: one parameter group, no decay
        params = [p for p in model.parameters() if p.requires_grad]
        return Optimizers([opt.LBFGS(params, lr=lr, max_iter=tc.lbfgs_max_iter, history_size=tc.lbfgs_history,
                                     line_search_fn="strong_wolfe")])
    if name == "muon":
        hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
        hidden_ids = {id(p) for p in hidden}
        rest = [{"params": [p for p in g["params"] if id(p) not in hidden_ids], "weight_decay": g["weight_decay"]}
                for g in groups]
        return Optimizers([
            Muon(hidden, lr=lr, weight_decay=tc.weight_decay, momentum=tc.muon_momentum, nesterov=True,
                     adjust_lr_fn="match_rms_adamw"),  # Moonshot's scaling: AdamW's lr and decay carry over
            opt.AdamW(rest, lr=lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=use_fused(model)),
        ])
    raise AssertionError(f"optimizer {name!r} passed validation but has no builder")


def lr_factor(step: int, tc: TrainConfig, total_steps: int) -> float:
    """lr(step) / lr: linear warmup from 0 over warmup_steps, then the named schedule down to min_lr / lr."""
    floor = tc.min_lr / tc.lr
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    span = max(1, total_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    if tc.schedule == "cosine":  # Loshchilov & Hutter 2017, without restarts
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if tc.schedule == "linear":
        return 1 - (1 - floor) * progress
    if tc.schedule == "wsd":  # warmup-stable-decay (Hu et al. 2024, MiniCPM): flat, then a linear cool-down
        decay_start = total_steps - int(tc.decay_fraction * total_steps)
        if step < decay_start:
            return 1.0
        return 1 - (1 - floor) * min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if tc.schedule == "step":
        every = tc.step_every or max(1, total_steps // 3)
        return max(floor, tc.step_gamma ** ((step - tc.warmup_steps) // every))
    raise AssertionError(tc.schedule)


def dropout_factor(step: int, tc: TrainConfig, total_steps: int) -> float:
    """The fraction of the configured dropout rates in force at `step`.

    early: on for the first dropout_until of training, then off (Liu et al. 2023, "Dropout Reduces
    Underfitting"); late: off, then on after dropout_until ("late dropout", same paper); linear: decays
    from the full rate to 0 over training; constant: always the full rate."""
    frac = step / max(1, total_steps)
    if tc.dropout_schedule == "constant":
        return 1.0
    if tc.dropout_schedule == "early":
        return 1.0 if frac < tc.dropout_until else 0.0
    if tc.dropout_schedule == "late":
        return 0.0 if frac < tc.dropout_until else 1.0
    if tc.dropout_schedule == "linear":
        return max(0.0, 1.0 - frac)
    raise AssertionError(tc.dropout_schedule)
