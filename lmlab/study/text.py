"""What a study measures about generated text: samples through lmlab.infer.generate's engine, their diversity, and
their log-probability under the model.

Diversity is counted over whitespace-separated words, for char and BPE models alike (a char model's characters
would make every text look diverse):
    distinct-n             distinct n-grams / all n-grams, pooled over the N samples (Li et al. 2016, "A
                           Diversity-Promoting Objective"): N identical samples score as one sample's worth
    repeated 4-gram rate   4-grams that already occurred earlier in the same sample / all 4-grams: loops
    distinct continuations how many of the N samples differ from each other
Mean per-token log-probability is taken under the model's own, unfiltered distribution (temperature 1): a
quality proxy in the sense that text the model finds likely is usually fluent, and its cost is blandness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.infer.generate import SamplingConfig, generate_ids


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams, pooled over `texts`; 0 when there are none."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(texts: list[str], n: int = 4) -> float:
    """The fraction of word n-grams that repeat an n-gram earlier in the same text, pooled over `texts`."""
    repeats = total = 0
    for t in texts:
        seen: set[tuple[str, ...]] = set()
        for g in ngrams(t.split(), n):
            repeats += g in seen
            total += 1
            seen.add(g)
    return repeats / total if total else 0.0


def distinct_continuations(texts: list[str]) -> int:
    return len(set(texts))


def diversity(texts: list[str]) -> dict[str, float]:
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repeated_4gram_rate": repeated_ngram_rate(texts, 4),
            "distinct_continuations": distinct_continuations(texts)}


def sample_ids(lm, prompt: str, s: SamplingConfig, n: int) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, n continuations as ids, EOS dropped), generated as one batch by the engine: row b draws with
    seed + b, so the rows differ where sampling is random and agree where it is greedy."""
    tok = lm.tokenizer
    ids = tok.encode(prompt)
    rows: list[list[int]] = [[] for _ in range(n)]
    eos = set(tok.eos_ids)
    for step in generate_ids(lm.model, [ids] * n, s, tok.eos_ids or None):
        for row, t in enumerate(step):
            if t is not None and t not in eos:
                rows[row].append(t)
    return ids, rows


@torch.no_grad()
def mean_logprob(model: torch.nn.Module, prompt: list[int], continuations: list[list[int]]) -> float:
    """Mean log-probability per generated token under the model at temperature 1, over all continuations."""
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    total, count = 0.0, 0
    try:
        for cont in continuations:
            if not cont:
                continue
            seq = (prompt + cont)[-model.cfg.context_length - 1:]  # the last context's worth of tokens
            x = torch.tensor([seq[:-1]], device=device)  # (1, T)
            logp = F.log_softmax(model(x)[0].float(), dim=-1)  # (T, V)
            k = min(len(cont), len(seq) - 1)  # the targets that are generated tokens
            targets = torch.tensor(seq[-k:], device=device)
            total += logp[-k:].gather(1, targets[:, None]).sum().item()
            count += k
    finally:
        model.train(was_training)
    return total / count if count else 0.0
