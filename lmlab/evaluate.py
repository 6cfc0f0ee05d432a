"""Loss and perplexity of a model on a prepared split or a text file, over every non-overlapping window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data import TokenData, iter_windows, windows_to_batch
from lmlab.errors import LmlabError
from lmlab.tokenizer import tokenizer_sha256


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int


def tokens_for(lm, data: str | Path, split: str = "val") -> np.ndarray:
    """A prepared data directory's split (its tokenizer must be the model's), or a text file tokenized."""
    path = Path(data)
    if path.is_dir():
        td = TokenData(path)
        _check_tokenizer(lm, td)
        if td.vocab_size > lm.config.vocab_size:
            raise LmlabError(f"{path} was tokenized with {td.vocab_size} tokens but the model knows "
                             f"{lm.config.vocab_size}; evaluate on data prepared with the model's tokenizer")
        if split not in td.splits:
            raise LmlabError(f"{path} has no split {split!r}; it has {', '.join(td.splits)}")
        return td.split(split)
    if path.is_file():
        if lm.tokenizer is None:
            raise LmlabError(f"{lm.source} has no tokenizer, so it cannot read a text file")
        return np.asarray(lm.tokenizer.encode(path.read_text(encoding="utf-8")), dtype=np.int64)
    raise LmlabError(f"data {data} not found: give a prepared data directory or a text file")


def _check_tokenizer(lm, td: TokenData) -> None:
    """Ids mean something only under the tokenizer that made them: refuse data from another one."""
    if lm.tokenizer is None:  # nothing to compare with; the vocabulary size check below still applies
        return
    ours, theirs = tokenizer_sha256(lm.tokenizer), td.tokenizer_sha256
    if ours != theirs:
        raise LmlabError(f"{td.path} was tokenized with a {_describe(td.tokenizer)} (fingerprint {theirs[:12]}), but "
                         f"{lm.source} uses a {_describe(lm.tokenizer)} (fingerprint {ours[:12]}); evaluate on a "
                         "text file instead, which is tokenized with the model's own tokenizer")


def _describe(tok) -> str:
    return f"{tok.vocab_size:,}-token {getattr(tok, 'kind', 'bpe')} tokenizer"


@torch.no_grad()
def evaluate(lm, tokens: np.ndarray, batch_size: int = 8, max_batches: int = 0, context: int = 0,
             quiet: bool = False) -> EvalResult:
    """Mean loss over non-overlapping windows of `context` tokens (default: the model's context)."""
    from tqdm.auto import tqdm

    T = min(context or lm.config.context_length, lm.config.context_length, max(1, len(tokens) - 1))
    if len(tokens) < 2:
        raise LmlabError("the evaluation data holds fewer than 2 tokens; give more text")
    model = lm.model.eval()
    total, count = 0.0, 0
    n_batches = -(-len(range(0, len(tokens) - T, T)) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    batches = iter_windows(tokens, T, batch_size)
    for _, starts in zip(tqdm(range(n_batches), desc="evaluating", unit="batch", disable=quiet, leave=False),
                         batches, strict=False):
        x, y = windows_to_batch(tokens, starts, T, lm.device)
        logits = model(x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 700)), count)
