"""A model's next-token distribution laid open, for people to look at (`lmlab lab`'s sampling and dropout views).

`next_token`: the model's own distribution at the end of a prompt, and the one generation would draw from after
the sampling filters (lmlab.infer.sampling.distribution: what `select` draws from, cut tokens at 0 and the rest
renormalised, and which tokens the filters kept). `step_through`: a generation token by token, each step's
distribution with the token drawn; the draw is `select` with a generator seeded as the engine seeds a row, so the
tokens are lmlab.generate's for the same prompt and settings. `dropout_spread`: the distribution in eval mode (the
same on every pass) beside passes in train mode (Gal & Ghahramani 2016's MC dropout), whose masks perturb the model
itself, while sampling only picks from a fixed distribution.

Each pass is a plain forward over the whole sequence (no KV cache): a few dozen tokens, for a person, not a server.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.config import SamplingConfig, check_rate
from lmlab.errors import LmlabError
from lmlab.infer.sampling import distribution, select
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

TOP = 50  # tokens drawn as bars
MAX_STEPS = 64  # tokens a step-through generates at most
MAX_PASSES = 200  # forward passes of the dropout view at most (in train mode)
EVAL_PASSES = 3  # eval mode is deterministic: a few passes show it, more would only repeat it


def _not_gone() -> bool:
    return False


def check_gone(gone: Callable[[], bool]) -> None:
    """Stop a long computation whose asker has left (a server passes `gone`; the page was closed or moved on)."""
    if gone():
        raise LmlabError("stopped: the request's client went away")


def encode_prompt(tokenizer: Tokenizer, text: str, context: int, room: int = 0) -> list[int]:
    """The prompt's ids, refused (one line, with the fix) when empty or when it and `room` new tokens would not
    fit the context: these passes never slide a window."""
    ids = tokenizer.encode(text)
    if not ids:
        raise LmlabError("is empty (0 tokens); type some text", "prompt")
    if len(ids) + room > context:
        need = f" plus the {room} tokens to generate" if room else ""
        raise LmlabError(f"has {len(ids)} tokens{need}, but the model's context is {context}; shorten it", "prompt")
    return ids


@torch.no_grad()
def last_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """The next-token logits (1, V), float32, after `ids`, in the model's current mode."""
    x = torch.tensor([ids], device=model.wte.weight.device)
    return model(x, last_only=True)[:, -1].float()


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def table(tokenizer: Tokenizer, logits: torch.Tensor, s: SamplingConfig, seen: torch.Tensor | None,
          top: int = TOP) -> dict[str, Any]:
    """The `top` most likely tokens of logits (1, V): each one's probability under the model (p) and after the
    filters of `s` (q: 0 where cut) and whether the filters kept it; how many tokens the filters keep in the whole
    vocabulary, and the filtered mass outside the rows shown."""
    p = F.softmax(logits, dim=-1)[0]
    q, kept = (x[0] for x in distribution(logits, s, seen))
    shown = torch.topk(p, min(top, p.numel())).indices.tolist()
    qs = q[shown].tolist()
    rows = [{"id": t, "text": token_text(tokenizer, t), "p": pt, "q": qt, "kept": k}
            for t, pt, qt, k in zip(shown, p[shown].tolist(), qs, kept[shown].tolist(), strict=True)]
    return {"tokens": rows, "kept": int(kept.sum()), "vocab": int(q.numel()), "q_outside": max(0.0, 1 - sum(qs))}


def _seen(ids: list[int], vocab: int, device: torch.device, s: SamplingConfig) -> torch.Tensor | None:
    """The (1, V) mask of tokens in context, for the repetition penalty (as the engine keeps it per row)."""
    if s.repetition_penalty == 1.0:
        return None
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, ids] = True
    return seen


def next_token(model: Transformer, tokenizer: Tokenizer, text: str, s: SamplingConfig,
               top: int = TOP) -> dict[str, Any]:
    """The distribution after the prompt `text`, before and after the filters of `s` (see `table`)."""
    ids = encode_prompt(tokenizer, text, model.cfg.context_length)
    logits = last_logits(model, ids)
    return {**table(tokenizer, logits, s, _seen(ids, logits.shape[-1], logits.device, s), top),
            "prompt_tokens": len(ids)}


def step_through(model: Transformer, tokenizer: Tokenizer, text: str, s: SamplingConfig, steps: int,
                 top: int = TOP, gone: Callable[[], bool] = _not_gone) -> list[dict[str, Any]]:
    """`steps` tokens generated one at a time (fewer if an EOS comes): each step's distribution (`table`) and the
    token drawn from it, as lmlab.generate draws (the filters, then `select` with the engine's seeded generator)."""
    if not 1 <= steps <= MAX_STEPS:
        raise LmlabError(f"must be in [1, {MAX_STEPS}], got {steps}", "steps")
    ids = encode_prompt(tokenizer, text, model.cfg.context_length, room=steps)
    device = model.wte.weight.device
    gen = None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed)
    seen, eos, out = None, set(getattr(tokenizer, "eos_ids", ()) or ()), []
    for _ in range(steps):
        check_gone(gone)
        logits = last_logits(model, ids)
        if seen is None:
            seen = _seen(ids, logits.shape[-1], device, s)
        step = table(tokenizer, logits, s, seen, top)
        token = int(select(logits, s, gen, seen)[0])
        out.append({**step, "chosen": {"id": token, "text": token_text(tokenizer, token), "eos": token in eos}})
        ids.append(token)
        if seen is not None:
            seen[0, token] = True
        if token in eos:
            break
    return out


@contextmanager
def train_mode(model: Transformer, rate: float | None) -> Any:
    """The model in train mode (dropout on) for the block, at its own rates or at `rate` on every site, and in
    eval mode with its own rates again afterwards; the global RNG is left as it was."""
    sites = (model.drop_embed, *[d for b in model.blocks for d in (b.attn.drop_probs, b.drop_attn, b.drop_mlp)])
    rates = [d.p for d in sites]
    with torch.random.fork_rng(devices=[model.wte.weight.device] if model.wte.weight.is_cuda else []):
        torch.manual_seed(0)  # the same masks each time the view is drawn
        try:
            if rate is not None:
                model.set_dropout(rate, rate, rate)
            model.train()
            yield
        finally:
            model.eval()
            for d, r in zip(sites, rates, strict=True):
                d.p = r


def dropout_spread(model: Transformer, tokenizer: Tokenizer, text: str, passes: int = 20, rate: float | None = None,
                   top: int = 20, gone: Callable[[], bool] = _not_gone) -> dict[str, Any]:
    """The model's next-token distribution after `text`, EVAL_PASSES times in eval mode and `passes` times in train
    mode (dropout at the model's own rates, or `rate` at every site): the `top` tokens of the eval distribution,
    each with its eval probability and its probability in every train-mode pass; how many distinct distributions
    each mode gave, and its spread: the mean total-variation distance of its passes from the eval distribution."""
    if isinstance(passes, bool) or not isinstance(passes, int) or not 2 <= passes <= MAX_PASSES:
        raise LmlabError(f"must be an integer in [2, {MAX_PASSES}], got {passes!r}", "passes")
    if rate is not None:
        check_rate("rate", rate)
    ids = encode_prompt(tokenizer, text, model.cfg.context_length)

    def pass_() -> torch.Tensor:
        check_gone(gone)
        return F.softmax(last_logits(model, ids)[0], dim=-1)

    evals = torch.stack([pass_() for _ in range(EVAL_PASSES)])  # (EVAL_PASSES, V)
    with train_mode(model, rate):
        rates = {"embed": model.drop_embed.p, "attn": model.blocks[0].attn.drop_probs.p,
                 "resid": model.blocks[0].drop_attn.p}
        trains = torch.stack([pass_() for _ in range(passes)])  # (passes, V)
    reference = evals[0]
    shown = torch.topk(reference, min(top, reference.numel())).indices.tolist()
    rows = [{"id": t, "text": token_text(tokenizer, t), "p": float(reference[t]), "train": trains[:, t].tolist(),
             "std": float(trains[:, t].std(correction=0))} for t in shown]

    def summary(passes_: torch.Tensor) -> dict[str, Any]:
        tv = 0.5 * (passes_ - reference).abs().sum(dim=-1)  # (N,) total-variation distance of each pass
        return {"distinct": int(torch.unique(passes_, dim=0).shape[0]), "spread": float(tv.mean()),
                "passes": passes_.shape[0]}

    return {"tokens": rows, "eval": summary(evals), "train": summary(trains), "rates": rates, "passes": passes,
            "prompt_tokens": len(ids)}
