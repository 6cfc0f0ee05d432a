"""The three dropout sites of `lmlab.model.Transformer`, checked statistically in train mode and exactly in eval.

Sites: (a) `model.drop_embed` on the embeddings, (b) the attention probabilities
(`attend(..., dropout)`, fed from `Attention.drop_probs`), (c) `block.drop_attn` / `block.drop_mlp` on each
sub-layer output before the residual add. Dropout is random, so each statistical check uses a fixed seed and a
bound of SIGMAS standard deviations: a correct implementation fails it with negligible probability, a wrong
rate or a missing 1/(1-p) rescale fails it by far more.
"""

from __future__ import annotations

import math

import pytest
import torch

import lmlab.model
from lmlab.config import ModelConfig
from lmlab.model import Dropout, Transformer, attend

SIGMAS = 6.0
FAMILIES = ("gpt2", "llama")
VOCAB, CTX = 50, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP threads wait badly for each other on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(family: str, **rates: float) -> ModelConfig:
    extra = {"n_kv_heads": 2, "d_ff": 64} if family == "llama" else {}
    return ModelConfig(family=family, vocab_size=VOCAB, context_length=CTX, d_model=32, n_layers=2, n_heads=4,
                       **extra, **rates)


def tokens(batch: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, CTX), generator=g)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


class Capture:
    """Forward hooks recording (input, output) of Dropout modules: the real module, only observed."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.seen[name].append((inputs[0].detach().clone(), output.detach().clone()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def dropout_modules(model: Transformer) -> dict[str, torch.nn.Module]:
    mods: dict[str, torch.nn.Module] = {"embed": model.drop_embed}
    for i, block in enumerate(model.blocks):
        mods[f"blocks.{i}.drop_attn"] = block.drop_attn
        mods[f"blocks.{i}.drop_mlp"] = block.drop_mlp
    return mods


@pytest.fixture
def attend_calls(monkeypatch):
    """Record the rate each Attention passes to `attend` (0.0 for none); the real `attend` still does the work."""
    calls: list[float] = []

    def spy(q, k, v, mask, dropout=None):
        calls.append(dropout.p if dropout is not None else 0.0)
        return attend(q, k, v, mask, dropout)

    monkeypatch.setattr(lmlab.model, "attend", spy)
    return calls


def assert_binomial(k: int, n: int, p: float, what: str) -> None:
    """k successes out of n trials is within SIGMAS standard deviations of Binomial(n, p)'s mean."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= SIGMAS * sd, f"{what}: {k}/{n} = {k / n:.4f}, expected about {p}"


def assert_inverted_dropout(inp: torch.Tensor, out: torch.Tensor, p: float, what: str) -> None:
    """out is inp with a fraction ~p zeroed and the rest scaled by exactly 1/(1-p), mean preserved."""
    live = inp != 0
    dropped = (out == 0) & live
    n = int(live.sum())
    assert n > 0.99 * inp.numel()  # the probe really feeds nonzero values
    assert_binomial(int(dropped.sum()), n, p, f"{what} dropped fraction")
    kept = live & ~dropped
    assert_rel_close(out[kept], inp[kept] / (1 - p), f"{what} kept values")
    # E[out - inp] = 0 with variance inp^2 p/(1-p) per element: the sum of the differences is near 0.
    diff = (out - inp)[live].double().sum()
    sd = math.sqrt(p / (1 - p) * float(inp[live].double().pow(2).sum()))
    assert abs(float(diff)) <= SIGMAS * sd, f"{what}: mean moved by {float(diff) / n:.3g} per element"


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    """Equal up to float32 rounding of the 1/(1-p) factor (a few ulps), elementwise."""
    assert actual.shape == expected.shape
    err = (actual - expected).abs()
    worst = float((err / expected.abs()).nan_to_num(0.0).max()) if err.numel() else 0.0
    assert bool((err <= rtol * expected.abs()).all()), f"{what}: max relative error {worst:.3g}"


def assert_identity(inp: torch.Tensor, out: torch.Tensor, what: str) -> None:
    assert torch.equal(out, inp), f"{what} changed its input but should not drop"


def drops(inp: torch.Tensor, out: torch.Tensor) -> int:
    return int(((out == 0) & (inp != 0)).sum())


# ---------------------------------------------------------------------------------------------------------
# Rates: config fields reach the modules, set_dropout moves them


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("fields", "expected"), [
    (dict(dropout=0.2), (0.2, 0.2, 0.2)),
    (dict(dropout=0.2, dropout_attn=0.0), (0.2, 0.0, 0.2)),
    (dict(dropout_embed=0.1, dropout_attn=0.2, dropout_resid=0.3), (0.1, 0.2, 0.3)),
    (dict(), (0.0, 0.0, 0.0)),
])
def test_config_rates_reach_every_site(family, fields, expected):
    model = Transformer(tiny(family, **fields))
    embed, attn, resid = expected
    assert (model.cfg.dropout_embed, model.cfg.dropout_attn, model.cfg.dropout_resid) == expected
    assert model.drop_embed.p == embed
    for block in model.blocks:
        assert block.attn.drop_probs.p == attn
        assert block.drop_attn.p == resid
        assert block.drop_mlp.p == resid


def rates(model: Transformer) -> tuple[float, list[float], list[float]]:
    return (model.drop_embed.p, [b.attn.drop_probs.p for b in model.blocks],
            [p for b in model.blocks for p in (b.drop_attn.p, b.drop_mlp.p)])


def test_set_dropout_changes_only_the_sites_named():
    model = Transformer(tiny("gpt2", dropout_embed=0.1, dropout_attn=0.2, dropout_resid=0.3))
    n = len(model.blocks)
    model.set_dropout()
    assert rates(model) == (0.1, [0.2] * n, [0.3] * 2 * n)
    model.set_dropout(attn=0.5)
    assert rates(model) == (0.1, [0.5] * n, [0.3] * 2 * n)
    model.set_dropout(embed=0.0, resid=0.4)
    assert rates(model) == (0.0, [0.5] * n, [0.4] * 2 * n)
    model.set_dropout(embed=0.25, attn=0.0, resid=0.0)
    assert rates(model) == (0.25, [0.0] * n, [0.0] * 2 * n)


def test_set_dropout_takes_effect_in_forward(attend_calls):
    """A model built without dropout drops at the new rates after set_dropout, and stops again at 0."""
    model = build(tiny("gpt2")).train()
    idx = tokens()
    with torch.no_grad():
        eval_out = model.eval()(idx)
        model.train()
        assert torch.equal(model(idx), eval_out)  # no dropout configured yet

        model.set_dropout(embed=0.5, attn=0.25, resid=0.1)
        cap = Capture(dropout_modules(model))
        attend_calls.clear()
        torch.manual_seed(1)
        train_out = model(idx)
        cap.remove()
    assert not torch.equal(train_out, eval_out)
    assert attend_calls == [0.25] * len(model.blocks)
    for name, [(inp, out)] in cap.seen.items():
        assert_inverted_dropout(inp, out, 0.5 if name == "embed" else 0.1, name)

    model.set_dropout(embed=0.0, attn=0.0, resid=0.0)
    with torch.no_grad():
        assert torch.equal(model(idx), eval_out)


# ---------------------------------------------------------------------------------------------------------
# Train mode: each site drops a fraction ~p and rescales the rest by 1/(1-p)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_embed_site_drops_p_and_rescales(family, p):
    model = build(tiny(family, dropout_embed=p)).train()
    cap = Capture({"embed": model.drop_embed})
    torch.manual_seed(2)
    with torch.no_grad():
        model(tokens())
    [(inp, out)] = cap.seen["embed"]
    assert inp.shape == (64, CTX, 32)
    assert_inverted_dropout(inp, out, p, "drop_embed")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_resid_sites_drop_p_and_rescale(family, p):
    model = build(tiny(family, dropout_resid=p)).train()
    mods = {k: v for k, v in dropout_modules(model).items() if k != "embed"}
    cap = Capture(mods)
    torch.manual_seed(3)
    with torch.no_grad():
        model(tokens())
    assert len(cap.seen) == 2 * len(model.blocks)
    for name, [(inp, out)] in cap.seen.items():
        assert_inverted_dropout(inp, out, p, name)


T_ATT = 32  # query length = key length = head_dim, so v can be the identity basis


def uniform_causal_probe(batch: int = 16, heads: int = 4):
    """q = k = 0 makes the causal softmax uniform, 1/(i+1) on row i; v = I makes the output that matrix."""
    q = torch.zeros(batch, heads, T_ATT, T_ATT)
    v = torch.eye(T_ATT).expand(batch, heads, T_ATT, T_ATT).contiguous()
    causal = torch.ones(T_ATT, T_ATT, dtype=torch.bool).tril()
    probs = causal / torch.arange(1, T_ATT + 1, dtype=torch.float32)[:, None]  # (T, T), row i: 1/(i+1)
    return q, v, causal, probs


@pytest.mark.parametrize("use_mask", [False, True], ids=["is_causal", "bool_mask"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_probabilities_drop_p_and_rescale(p, use_mask):
    q, v, causal, probs = uniform_causal_probe()
    mask = causal[None, None] if use_mask else None
    assert_rel_close(attend(q, q, v, mask), probs.expand_as(v).contiguous(), "undropped probe")

    torch.manual_seed(4)
    y = attend(q, q, v, mask, Dropout(p))  # (B, H, T, T): the dropped probability matrices
    assert torch.equal(y[..., ~causal], torch.zeros_like(y[..., ~causal]))  # never attends ahead
    yc, pc = y[..., causal], probs[causal]  # (B, H, N) causal entries, (N,)
    dropped = yc == 0
    assert_binomial(int(dropped.sum()), yc.numel(), p, "attention probabilities dropped")
    assert_rel_close(yc[~dropped], (pc / (1 - p)).expand_as(yc)[~dropped], "kept probabilities")

    # Means over the B*H samples match the undropped probabilities, entry by entry and as row sums (= 1).
    n = yc.shape[0] * yc.shape[1]
    entry_sd = pc * math.sqrt(p / (1 - p) / n)
    assert ((yc.mean(dim=(0, 1)) - pc).abs() <= SIGMAS * entry_sd).all()
    rows = torch.arange(1, T_ATT + 1, dtype=torch.float32)
    row_sd = torch.sqrt(p / (1 - p) / rows / n)  # row i sums i+1 entries of variance (1/(i+1))^2 p/(1-p)
    assert ((y.sum(-1).mean(dim=(0, 1)) - 1).abs() <= SIGMAS * row_sd).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_module_passes_its_rate_only_in_training(family, attend_calls):
    model = build(tiny(family, dropout_attn=0.3))
    with torch.no_grad():
        model.train()(tokens(4))
        assert attend_calls == [0.3] * len(model.blocks)
        attend_calls.clear()
        model.eval()(tokens(4))
        assert attend_calls == [0.0] * len(model.blocks)


# ---------------------------------------------------------------------------------------------------------
# Eval mode is deterministic; zero rates make train == eval; each site answers to its own rate


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_is_deterministic_and_train_is_not(family):
    model = build(tiny(family, dropout_embed=0.1, dropout_attn=0.2, dropout_resid=0.3))
    idx = tokens(8)
    with torch.no_grad():
        model.eval()
        torch.manual_seed(10)
        a = model(idx)
        torch.manual_seed(11)
        b = model(idx)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(10)
        c = model(idx)
        torch.manual_seed(11)
        d = model(idx)
        torch.manual_seed(10)
        c_again = model(idx)
    assert not torch.equal(c, d)  # dropout is live in train mode ...
    assert not torch.equal(c, a)
    assert torch.equal(c, c_again)  # ... and reproducible under a fixed seed


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_rates_make_train_equal_eval(family):
    idx = tokens(8)
    model = build(tiny(family, dropout=0.0))
    with torch.no_grad():
        assert torch.equal(model.train()(idx), model.eval()(idx))
    # The same after set_dropout brings nonzero rates down to 0.
    model = build(tiny(family, dropout=0.4))
    model.set_dropout(embed=0.0, attn=0.0, resid=0.0)
    with torch.no_grad():
        assert torch.equal(model.train()(idx), model.eval()(idx))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ["embed", "attn", "resid"])
def test_each_site_responds_to_its_own_rate_only(family, site, attend_calls):
    p = 0.3
    rate = {f"dropout_{s}": (p if s == site else 0.0) for s in ("embed", "attn", "resid")}
    model = build(tiny(family, **rate))
    idx = tokens(8)
    cap = Capture(dropout_modules(model))
    with torch.no_grad():
        torch.manual_seed(5)
        train_out = model.train()(idx)
        train_seen, train_calls = dict(cap.seen), list(attend_calls)
        cap.seen = {name: [] for name in cap.seen}
        attend_calls.clear()
        eval_out = model.eval()(idx)
    cap.remove()

    assert not torch.equal(train_out, eval_out)
    assert train_calls == [p if site == "attn" else 0.0] * len(model.blocks)
    for name, [(inp, out)] in train_seen.items():
        mine = (site == "embed" and name == "embed") or (site == "resid" and name != "embed")
        if mine:
            assert drops(inp, out) > 0, f"{name} should drop at rate {p}"
            kept = out != 0
            assert_rel_close(out[kept], inp[kept] / (1 - p), name)
        else:
            assert_identity(inp, out, name)
    # Eval: every site is the identity.
    assert attend_calls == [0.0] * len(model.blocks)
    for name, [(inp, out)] in cap.seen.items():
        assert_identity(inp, out, name)


# ---------------------------------------------------------------------------------------------------------
# Placement: which tensor each site drops, proven against a forward computed by hand from the weights


def test_dropout_acts_on_the_embedding_sum_the_attention_probabilities_and_each_sublayer_output():
    """A GPT-2 forward written out here from the module's weights, dropping with torch's own F.dropout where
    Vaswani et al. put dropout: on wte+wpe, on softmax(qk^T/sqrt(D)), and on each sub-layer output before its
    residual add. Replayed from the same seed, the reference draws the same masks in the same order (on CPU SDPA's
    attention dropout draws as F.dropout does), so the logits agree only if every site drops what the paper
    drops; the hooked modules must also have seen exactly the reference's tensor."""
    import torch.nn.functional as F

    rates = {"embed": 0.2, "probs": 0.3, "resid": 0.4}
    cfg = tiny("gpt2", dropout_embed=rates["embed"], dropout_attn=rates["probs"], dropout_resid=rates["resid"])
    model = build(cfg).train()
    cap = Capture(dropout_modules(model))
    idx = tokens(4)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(idx)
    cap.remove()

    def drop(name: str, x: torch.Tensor, p: float) -> torch.Tensor:
        if name in cap.seen:
            [(seen_in, seen_out)] = cap.seen[name]
            torch.testing.assert_close(seen_in, x, rtol=1e-5, atol=1e-6, msg=f"{name} dropped another tensor")
            assert (seen_out == 0).any(), f"{name} dropped nothing"
        return F.dropout(x, p)

    torch.manual_seed(7)
    B, T, C, H = *idx.shape, cfg.d_model, cfg.n_heads
    D = C // H
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        x = drop("embed", model.wte.weight[idx] + model.wpe.weight[torch.arange(T)], rates["embed"])
        for i, b in enumerate(model.blocks):
            h = F.layer_norm(x, (C,), b.norm1.weight, b.norm1.bias, cfg.norm_eps)
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in F.linear(h, b.attn.qkv.weight, b.attn.qkv.bias)
                       .split(C, dim=-1))
            att = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~causal, float("-inf")), -1)
            att = drop(f"blocks.{i}.probs", att, rates["probs"])  # (B, H, T, T)
            y = F.linear((att @ v).transpose(1, 2).reshape(B, T, C), b.attn.proj.weight, b.attn.proj.bias)
            x = x + drop(f"blocks.{i}.drop_attn", y, rates["resid"])
            h = F.layer_norm(x, (C,), b.norm2.weight, b.norm2.bias, cfg.norm_eps)
            m = F.linear(F.gelu(F.linear(h, b.mlp.up.weight, b.mlp.up.bias), approximate="tanh"), b.mlp.down.weight,
                         b.mlp.down.bias)
            x = x + drop(f"blocks.{i}.drop_mlp", m, rates["resid"])
        logits = F.linear(F.layer_norm(x, (C,), model.norm_f.weight, model.norm_f.bias, cfg.norm_eps),
                          model.lm_head.weight)
    torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# torch.compile: a moving rate is data, not a guarded constant


def test_compiled_model_follows_a_moving_dropout_schedule_without_recompiling():
    """Five steps of a decaying schedule on every site: one compiled graph (a recompile raises), dropout live in
    each step, and the compiled Dropout drops a fraction p and scales the kept values by exactly 1/(1-p)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lmlab.model import Dropout

    torch._dynamo.reset()
    counters.clear()
    model = build(tiny("llama", dropout=0.3)).train()
    compiled = torch.compile(model, backend="aot_eager")
    idx = tokens(4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, rate in enumerate((0.3, 0.24, 0.18, 0.12, 0.06)):
            model.set_dropout(embed=rate, attn=rate, resid=rate)
            torch.manual_seed(step)
            got = compiled(idx)
            got.float().pow(2).mean().backward()
            assert torch.isfinite(got).all() and not torch.equal(got, model.eval()(idx))  # dropout was live
            model.train()
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
    drop = Dropout(0.3).train()
    f = torch.compile(drop, backend="aot_eager")
    x, n = torch.ones(200_000), 200_000
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rate in (0.3, 0.1, 0.45):
            drop.p = rate
            y = f(x)
            kept = y[y != 0]
            assert abs((n - kept.numel()) / n - rate) < 6 * (rate * (1 - rate) / n) ** 0.5
            assert torch.equal(kept, torch.full_like(kept, 1 / torch.tensor(1 - rate, dtype=torch.float32)))
