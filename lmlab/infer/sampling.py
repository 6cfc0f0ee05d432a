"""Selecting the next token: small pure functions on logits (B, V), and `select`, which applies them (the
distribution it draws from is `probabilities`; `distribution` adds which tokens the filters kept: lmlab lab
draws both).

The filters run in the order HF transformers applies its logits processors (`GenerationMixin._get_logits_processor`):
repetition penalty, then temperature, top-k, top-p (Holtzman et al. 2020), min-p (Nguyen et al. 2024). Greedy
decoding (temperature 0) applies the penalty alone and takes the argmax, as HF does with do_sample=False. Their
settings are lmlab.config.SamplingConfig.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.config import SamplingConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: positive logits divided by `penalty`, negative ones multiplied.
    `seen` is a (B, V) boolean mask of the tokens in each row's context."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (ties with the k-th kept too, as HF does)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)  # the low tail holding at most 1-p of the mass
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times the top token's probability."""
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, s: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All filters of `s`, in HF's order. Greedy settings apply the repetition penalty alone."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return logits
    if s.temperature != 1.0:
        logits = apply_temperature(logits, s.temperature)
    if s.top_k:
        logits = apply_top_k(logits, s.top_k)
    if s.top_p < 1.0:
        logits = apply_top_p(logits, s.top_p)
    if s.min_p:
        logits = apply_min_p(logits, s.min_p)
    return logits


def probabilities(logits: torch.Tensor, s: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) that `select` picks from: the softmax of the filtered logits (0 where a filter cut
    the token, the rest renormalised), or all the mass on the argmax when greedy."""
    return _softmax(process_logits(logits, s, seen), s)


def distribution(logits: torch.Tensor, s: SamplingConfig,
                 seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`probabilities`, and beside it the (B, V) mask of the tokens the filters keep: those whose filtered logit is
    finite (greedy: the argmax alone). A kept token's probability can still be 0 in float32 (temperature 0.01
    sends most of a vocabulary's softmax below 1e-45), so what was cut is told by the filters, never by the
    probability."""
    logits = process_logits(logits, s, seen)
    probs = _softmax(logits, s)
    return probs, probs > 0 if s.greedy else torch.isfinite(logits)


def _softmax(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Filtered logits -> the distribution drawn from (one-hot on the argmax when greedy)."""
    if s.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return F.softmax(logits, dim=-1)


def select(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): the argmax when greedy, else a draw from the filtered softmax."""
    if s.greedy:
        return process_logits(logits, s, seen).argmax(dim=-1)
    return torch.multinomial(probabilities(logits, s, seen), 1, generator=generator).squeeze(-1)
