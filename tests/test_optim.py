"""Optimizers by name, parameter groups, learning-rate schedules and dropout schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import OPTIMIZERS, ModelConfig, TrainConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.training.optim import build_optimizer, dropout_factor, lr_factor, param_groups

LRS = {"sgd": 0.5, "momentum": 0.1, "nesterov": 0.1, "adagrad": 0.05, "rmsprop": 3e-3, "adam": 3e-3,
       "adamw": 3e-3, "muon": 3e-3, "lbfgs": 0.5}


def _tiny(family: str = "gpt2") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(family=family, vocab_size=16, context_length=16, d_model=32, n_layers=2,
                                   n_heads=4, n_kv_heads=2 if family == "llama" else None))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    # A learnable pattern: each token is the previous one plus 3, mod 16.
    start = torch.arange(8)[:, None] * 5
    seq = (start + 3 * torch.arange(17)[None]) % 16
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_the_loss(name):
    model = _tiny("llama" if name == "muon" else "gpt2")
    opt = build_optimizer(model, TrainConfig(optimizer=name, lr=LRS[name], weight_decay=0.0))
    x, y = _batch()

    def loss_fn():
        return F.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1))

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    before = loss_fn().item()
    for _ in range(5 if name == "lbfgs" else 15):
        opt.step(closure)
    after = loss_fn().item()
    assert after < 0.8 * before, f"{name}: {before:.3f} -> {after:.3f}"


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _tiny("llama")
    muon, adamw = build_optimizer(model, TrainConfig(optimizer="muon")).optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        in_muon = id(p) in muon_ids
        assert in_muon == (p.dim() == 2 and name.startswith("blocks.")), name
    assert id(model.wte.weight) not in muon_ids and id(model.lm_head.weight) not in muon_ids


def test_weight_decay_only_on_matrices():
    model = _tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _curve(schedule: str, **kw) -> list[float]:
    tc = TrainConfig(schedule=schedule, lr=1.0, min_lr=0.1, warmup_steps=10, **kw)
    return [lr_factor(s, tc, 110) for s in range(110)]


def test_warmup_is_linear_for_every_schedule():
    for schedule in ("constant", "cosine", "linear", "wsd", "step"):
        c = _curve(schedule)
        assert c[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_schedule_shapes():
    const, cos, lin = _curve("constant"), _curve("cosine"), _curve("linear")
    assert const[10:] == [1.0] * 100
    assert cos[10] == pytest.approx(1.0) and cos[60] == pytest.approx(0.55) and cos[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:], strict=False))
    assert lin[60] == pytest.approx(0.55) and lin[109] == pytest.approx(0.1 + 0.9 / 100)
    wsd = _curve("wsd", decay_fraction=0.2)  # decays over the last 22 of 110 steps
    assert wsd[10:88] == [1.0] * 78 and wsd[88] == 1.0 and wsd[99] == pytest.approx(0.55) and wsd[109] < 0.2
    step = _curve("step", step_every=25, step_gamma=0.5)
    assert step[10] == step[34] == 1.0 and step[35] == 0.5 and step[60] == 0.25 and step[109] == 0.125 / 1
    assert min(_curve("step", step_every=10, step_gamma=0.1)) == pytest.approx(0.1)  # floored at min_lr


def test_dropout_schedules():
    def rates(schedule):
        tc = TrainConfig(dropout_schedule=schedule, dropout_until=0.25)
        return [dropout_factor(s, tc, 100) for s in range(100)]

    assert rates("constant") == [1.0] * 100
    assert rates("early") == [1.0] * 25 + [0.0] * 75
    assert rates("late") == [0.0] * 25 + [1.0] * 75
    lin = rates("linear")
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5) and lin[99] == pytest.approx(0.01)


@pytest.mark.parametrize("bad, match", [
    (dict(optimizer="adamz"), "unknown optimizer 'adamz' \\(did you mean 'adam'"),
    (dict(schedule="cosin"), "unknown schedule"), (dict(init="xavir"), "unknown init"),
    (dict(dropout_schedule="sometimes"), "unknown dropout_schedule"), (dict(lr=-0.1), "lr must be"),
    (dict(lr=0.0), "lr must be positive"), (dict(batch_size=0), "batch_size"),
    (dict(max_steps=0, max_tokens=0), "max_steps or max_tokens"), (dict(beta2=1.0), "beta2"),
])
def test_bad_train_settings(bad, match):
    with pytest.raises(LmlabError, match=match):
        TrainConfig(**bad)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rate_outside_unit_interval(rate):
    with pytest.raises(LmlabError, match="dropout"):
        ModelConfig(dropout=rate)
    with pytest.raises(LmlabError, match="dropout_attn"):
        ModelConfig(dropout_attn=rate)


@pytest.mark.parametrize("scheme", ["gpt2", "xavier", "orthogonal"])
def test_init_schemes(scheme):
    model = _tiny()
    model.init_weights(scheme)
    w = model.blocks[0].mlp.up.weight  # (d_ff, d_model) = (128, 32)
    proj = model.blocks[0].attn.proj.weight
    if scheme == "gpt2":
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
        assert proj.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.15)  # 1/sqrt(2 * n_layers)
    elif scheme == "xavier":
        assert w.std().item() == pytest.approx(math.sqrt(2 / (128 + 32)), rel=0.1)
    else:
        assert torch.allclose(w.T @ w, torch.eye(32), atol=1e-5)  # orthonormal columns
    assert torch.all(model.blocks[0].norm1.weight == 1)


def test_muon_matches_torch_muon():
    """lmlab's Muon only moves torch's Newton-Schulz iteration to float32 on CPU: in bfloat16 it is torch's bit for
    bit, and three steps land where torch.optim.Muon's do, within bfloat16's rounding of the update."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    from lmlab.training.optim import Muon, orthogonalize

    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    coeffs = (3.4445, -4.7750, 2.0315)
    assert torch.equal(orthogonalize(g[None], coeffs, 5, 1e-7, torch.bfloat16)[0],
                       _zeropower_via_newtonschulz(g, coeffs, 5, 1e-7))
    shapes = [(32, 96), (32, 96), (48, 16)]  # two share a shape: they go through one batched iteration

    def weights():
        return [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i)))
                for i, s in enumerate(shapes)]

    ours, theirs = weights(), weights()
    steps = [(Muon(ours, lr=0.02, adjust_lr_fn="match_rms_adamw"), ours),
             (torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw"), theirs)]
    for i in range(3):
        grads = [torch.randn(*s, generator=torch.Generator().manual_seed(10 + 3 * i + j)) for j, s in enumerate(shapes)]
        for optimizer, params in steps:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for mine, reference, start in zip(ours, theirs, weights(), strict=True):
        moved = (reference - start).detach().abs()
        assert moved.mean() > 0.005  # the three steps did move the weights
        assert ((mine - reference).abs().max() / moved.max()) < 0.05
    assert steps[0][0].state_dict()["state"].keys() == steps[1][0].state_dict()["state"].keys()
