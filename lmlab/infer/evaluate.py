"""Loss and perplexity of a model on a prepared split or a text file, and the one evaluation loop behind them.

`evaluate` scores every token of the data with a strided sliding window, the method of HF's perplexity guide
(https://huggingface.co/docs/transformers/perplexity): windows of `context` tokens start every `stride`
tokens, and each scores only the tokens the previous window did not, so every token after the first window
is predicted from at least context - stride tokens of context. The head and cross-entropy run over chunks of
positions, so memory is bounded by `chunk` x vocab fp32 logits, not by (batch, context, vocab).

`mean_loss` is the same loop for the training loop's fixed val/train subsets (every target of each window).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config import MAX_DEFAULT_CONTEXT, EvalConfig
from lmlab.data.tokens import TokenData, windows_to_batch
from lmlab.errors import LmlabError
from lmlab.tokenizer import tokenizer_sha256
from lmlab.utils import read_text


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int  # targets scored
    context: int
    stride: int


def sliding_windows(n_tokens: int, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, scored): window i reads tokens[starts[i] : starts[i] + context + 1] and scores its last scored[i]
    targets, those no earlier window scored. Unlike HF's loop, whose last window is short, the last window is
    moved left to end at the last token: the tail keeps its full context and every window has one shape."""
    last = n_tokens - 1 - context  # the start of the window that ends at the last token
    starts = np.append(np.arange(0, last, stride, dtype=np.int64), last)
    ends = starts + context
    scored = np.diff(ends, prepend=0)
    return starts, scored


def window_loss(net: torch.nn.Module, data: np.ndarray, starts: np.ndarray, T: int, device: torch.device,
                scored: np.ndarray | None = None, chunk: int = 0) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats, fp32) and the number of targets, over the windows at `starts`, each
    scoring its last scored[i] targets (all T when None). chunk 0: one call of `net`, which may be wrapped (DDP,
    FSDP, compiled); chunk N: the body once, then lm_head and the loss on N positions at a time."""
    x, y = windows_to_batch(data, starts, T, device)  # (B, T) each
    if scored is None and not chunk:  # every target: the model's own loss, inside a compiled model's graph
        return net(x, targets=y) * y.numel(), y.numel()
    keep = None
    if scored is not None:
        first = T - torch.as_tensor(np.asarray(scored), device=device)  # (B,) first scored position
        keep = torch.arange(T, device=device)[None, :] >= first[:, None]  # (B, T)
    out = net(x) if not chunk else net(x, head=False)  # (B, T, vocab) logits, or (B, T, C) hidden states
    out, y = (out[keep], y[keep]) if keep is not None else (out.reshape(-1, out.size(-1)), y.reshape(-1))
    if not chunk:
        return F.cross_entropy(out.float(), y, reduction="sum"), y.numel()
    head = net.lm_head
    total = torch.zeros((), device=device)
    for i in range(0, len(y), chunk):
        total += F.cross_entropy(head(out[i:i + chunk]).float(), y[i:i + chunk], reduction="sum")  # (chunk, vocab)
    return total, y.numel()


def loss_over(net: torch.nn.Module, data: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray | None]],
              T: int, device: torch.device, bf16: bool = False, chunk: int = 0) -> tuple[float, int]:
    """The evaluation loop: summed loss and target count over batches of (starts, scored), in eval mode without
    gradients (bf16: under bfloat16 autocast, as training runs), restoring the module's mode afterwards."""
    was_training = net.training
    net.eval()
    losses, count = [], 0  # device tensors, read in one copy at the end: no sync per batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    try:
        with torch.no_grad(), autocast:
            for starts, scored in batches:
                loss, n = window_loss(net, data, starts, T, device, scored, chunk)
                losses.append(loss)
                count += n
    finally:
        net.train(was_training)
    return sum(torch.stack(losses).tolist()) if losses else 0.0, count


def mean_loss(net: torch.nn.Module, data: np.ndarray, windows: Iterable[np.ndarray], T: int, device: torch.device,
              bf16: bool = False) -> float:
    """Mean loss over every target of windows of T tokens at the given batches of starts (the training loop's
    fixed val/train subsets, from data.eval_windows)."""
    total, count = loss_over(net, data, ((w, None) for w in windows), T, device, bf16)
    return total / count


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
        return np.asarray(lm.tokenizer.encode(read_text(path, "data file")), dtype=np.int64)
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


def evaluate(lm, tokens: np.ndarray, cfg: EvalConfig | None = None, quiet: bool = False, **settings) -> EvalResult:
    """Mean loss per token by the strided sliding window (module docstring), as `cfg` (EvalConfig's defaults, or
    its fields given as keywords) says: context 0 is the model's context, at most MAX_DEFAULT_CONTEXT; stride 0
    is context // 2, as in HF's guide; max_batches 0 all of them; chunk 0 no chunking."""
    from tqdm.auto import tqdm

    cfg = dataclasses.replace(cfg or EvalConfig(), **settings)
    T, stride = _check_eval_args(lm, len(tokens), cfg.context, cfg.stride)
    B = cfg.batch_size
    starts, scored = sliding_windows(len(tokens), T, stride)
    n_batches = -(-len(starts) // B)
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    batches = ((starts[i:i + B], scored[i:i + B]) for i in range(0, n_batches * B, B))
    bar = tqdm(batches, total=n_batches, desc="evaluating", unit="batch", disable=quiet, leave=False)
    total, count = loss_over(lm.model, tokens, bar, T, lm.device, chunk=cfg.chunk)
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 700)), count, T, stride)


def _check_eval_args(lm, n_tokens: int, context: int, stride: int) -> tuple[int, int]:
    """The window length and stride to use, or an LmlabError naming the flag."""
    if context > lm.config.context_length:
        raise LmlabError(f"--context {context} exceeds the model's context length {lm.config.context_length}")
    if n_tokens < 2:
        raise LmlabError("the evaluation data holds fewer than 2 tokens; give more text")
    window = context or min(lm.config.context_length, MAX_DEFAULT_CONTEXT)
    stride = stride or max(1, window // 2)
    if stride > window:
        raise LmlabError(f"--stride {stride} is longer than the window ({window} tokens): tokens between windows "
                         "would go unscored; use a stride of at most the context")
    T = min(window, n_tokens - 1)  # data shorter than one window: one window over all of it
    return T, min(stride, T)
