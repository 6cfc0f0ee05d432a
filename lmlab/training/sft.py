"""Instruction data for supervised fine-tuning: JSON or JSONL records -> token ids and loss labels -> batches.

Records are Alpaca-style `{"instruction", "input"?, "output", "system"?}` (Taori et al. 2023) or chat-style
`{"messages": [{"role", "content"}, ...]}`. Each becomes a conversation, rendered by lmlab.infer.chat with the model's
own chat template (so the model trains on exactly what `lmlab chat` will show it) or the plain User:/Assistant:
format. The loss covers the assistant's replies only, unless `train_on_prompt`: each reply's text is found by
rendering the conversation up to it (with the generation prompt) and through it, and the pieces are tokenized
one by one, so a label is the prompt's or the reply's by construction. Masked labels are -100, the ignore index
of torch's cross_entropy; padding is masked too, so neither reaches the loss.

Batches are a pure function of (step, micro), as in lmlab.data.tokens, so a killed fine-tune resumes exactly. A batch
is padded on the right to its longest example: causal attention never lets a real token see the padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config import MAX_DEFAULT_CONTEXT, SFTConfig
from lmlab.errors import LmlabError
from lmlab.model import IGNORE_INDEX as IGNORE  # F.cross_entropy's default ignore_index
from lmlab.templates import check_messages, encode_rendered, render_for
from lmlab.tokenizer import Tokenizer
from lmlab.utils import read_text


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) for each record of a JSONL file (one object a line, blank lines skipped) or a JSON file
    holding a list of objects; `where` names the line (JSONL) or the record (JSON) for error messages."""
    path = Path(path)
    text = read_text(path, "instruction data file")
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        return [(f"{path} record {i + 1}", r) for i, r in enumerate(data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path} line {lineno}: not valid JSON ({e.msg}, column {e.colno}); JSONL holds one "
                             "JSON object per line") from None
    return records


def to_messages(record: Any, where: str) -> list[dict]:
    """The conversation a record describes, ending with the assistant's reply; one clear line when it cannot."""
    if not isinstance(record, dict):
        raise LmlabError(f"{where}: expected a JSON object with instruction and output, or with messages; got "
                         f"{type(record).__name__}")
    if "messages" in record:
        try:
            messages = check_messages(record["messages"])
        except LmlabError as e:
            raise LmlabError(f"{where}: {e}") from None
        if not messages or messages[-1]["role"] != "assistant":
            raise LmlabError(f"{where}: the messages must end with an assistant reply (the text to learn)")
        return messages
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            what = "missing" if key not in record else f"not a string ({record[key]!r:.40})"
            raise LmlabError(f"{where}: {key!r} is {what}; Alpaca-style records need an instruction and an output "
                             "string (input and system are optional), chat-style ones a messages list")
    for key in ("input", "system"):
        if not isinstance(record.get(key, ""), str):
            raise LmlabError(f"{where}: {key!r} must be a string, got {record[key]!r:.40}")
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def read_conversations(path: str | Path) -> list[tuple[str, list[dict]]]:
    """(where, conversation) for every record of the file: every record checked before any is tokenized."""
    return [(where, to_messages(record, where)) for where, record in read_records(path)]


def segments(tokenizer: Tokenizer, messages: list[dict], plain: bool, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_reply) pieces: a reply runs from the end of the conversation rendered
    up to it with the generation prompt to the end of it rendered through the reply (its end-of-turn included)."""
    full = render_for(tokenizer, messages, add_generation_prompt=False, plain=plain)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render_for(tokenizer, messages[:i], add_generation_prompt=True, plain=plain)
        end = render_for(tokenizer, messages[:i + 1], add_generation_prompt=False, plain=plain)
        if not (full.startswith(start) and full.startswith(end) and pos <= len(start) <= len(end)):
            raise LmlabError(f"{where}: the chat template renders this conversation differently turn by turn, so "
                             "the replies cannot be told from the prompt; use --template plain")
        pieces += [(full[pos:len(start)], False), (full[len(start):len(end)], True)]
        pos = len(end)
    return [*pieces, (full[pos:], False)]


def encode_example(tokenizer: Tokenizer, messages: list[dict], sft: SFTConfig, where: str) -> tuple[list, list]:
    """(ids, labels) of one conversation: labels[i] = ids[i] where the loss counts token i, IGNORE elsewhere."""
    plain = sft.template == "plain" or not getattr(tokenizer, "chat_template", None)
    ids, labels = [], []
    for text, reply in segments(tokenizer, messages, plain, where):
        try:
            piece = encode_rendered(tokenizer, text) if text else []
        except LmlabError as e:  # a character tokenizer meeting a character it never saw
            raise LmlabError(f"{where}: {e}") from None
        ids += piece
        labels += piece if reply or sft.train_on_prompt else [IGNORE] * len(piece)
    eos = getattr(tokenizer, "eos_id", None)
    if plain and eos is not None:  # the plain format has no end-of-turn token: learn to stop with EOS
        ids.append(eos)
        labels.append(eos)
    return ids, labels


@dataclass
class Example:
    x: np.ndarray  # (n,) input ids
    y: np.ndarray  # (n,) next-token labels, IGNORE where masked


def load_examples(path: str | Path, tokenizer: Tokenizer, sft: SFTConfig, max_length: int,
                  vocab_size: int) -> tuple[list[Example], int]:
    """The file's examples (inputs and shifted labels, cut to max_length tokens) and how many were dropped
    because no reply token was left within max_length."""
    examples, dropped = [], 0
    for where, messages in read_conversations(path):
        ids, labels = encode_example(tokenizer, messages, sft, where)
        if ids and max(ids) >= vocab_size:
            raise LmlabError(f"{where}: token id {max(ids)} is outside the model's vocabulary ({vocab_size}); the "
                             "tokenizer does not belong to this model")
        ids, labels = ids[:max_length + 1], labels[:max_length + 1]
        if len(ids) < 2 or all(t == IGNORE for t in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(np.asarray(ids[:-1], dtype=np.int64), np.asarray(labels[1:], dtype=np.int64)))
    if not examples:
        raise LmlabError(f"{path} holds no usable example (records: {dropped} without a reply within {max_length} "
                         "tokens); add records, or raise --max-length")
    return examples, dropped


def pad_batch(examples: list[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) (B, T) int64, right-padded to the longest example: x with id 0, y with IGNORE."""
    T = max(len(e.x) for e in examples)
    x = np.zeros((len(examples), T), dtype=np.int64)
    y = np.full((len(examples), T), IGNORE, dtype=np.int64)
    for i, e in enumerate(examples):
        x[i, :len(e.x)], y[i, :len(e.y)] = e.x, e.y
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def masked_loss(net: torch.nn.Module, batches: list[list[Example]], device: torch.device, bf16: bool) -> float:
    """Mean loss over every unmasked label of the batches, in eval mode without gradients."""
    was_training, total, count = net.training, 0.0, 0
    net.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        with torch.no_grad(), autocast:
            for batch in batches:
                x, y = pad_batch(batch, device)
                logits = net(x)  # (B, T, vocab)
                total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
                count += int((y != IGNORE).sum())
    finally:
        net.train(was_training)
    return total / count


class SFTData:
    """Instruction examples split into train and val, served as the training loop's data (lmlab.training.loop.Data's
    methods): batches by (step, micro) drawn as lmlab.data.tokens.Batches draws windows, and the fixed evaluation
    sets."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, sft: SFTConfig, vocab_size: int, context: int,
                 batch_size: int, grad_accum: int, seed: int, sampling: str, rank: int = 0, world: int = 1,
                 eval_batches: int = 1, eval_batch_size: int = 0) -> None:
        self.path, self.tokenizer, self.sft, self.vocab_size = Path(path), tokenizer, sft, vocab_size
        self.max_length = min(sft.max_length or min(context, MAX_DEFAULT_CONTEXT), context)
        examples, self.dropped = load_examples(path, tokenizer, sft, self.max_length, vocab_size)
        if len(examples) < 2:
            raise LmlabError(f"{path} holds {len(examples)} usable example; fine-tuning needs at least 2 (one held "
                             "out for validation)")
        order = np.random.default_rng([seed, 31337]).permutation(len(examples))
        n_val = min(len(examples) - 1, max(1, round(len(examples) * sft.val_fraction)))
        self.val = [examples[i] for i in order[len(examples) - n_val:]]
        self.train = [examples[i] for i in order[:len(examples) - n_val]]
        self.B, self.accum, self.seed, self.sampling, self.rank, self.world = (batch_size, grad_accum, seed,
                                                                                sampling, rank, world)
        mean_len = float(np.mean([len(e.x) for e in self.train]))
        self.tokens_per_batch = max(1, round(batch_size * mean_len))  # real (unpadded) tokens, on average
        n_eval = eval_batches * batch_size
        size = eval_batch_size or batch_size
        self.val_batches = _chunks(self.val[:n_eval], size)
        train_eval = np.random.default_rng([seed, 104729]).permutation(len(self.train))[:n_eval]
        self.train_batches = _chunks([self.train[i] for i in train_eval], size)
        self._order: tuple[int, np.ndarray] | None = None

    def indices(self, step: int, micro: int) -> np.ndarray:
        """This rank's example indices for one micro-batch: random draws seeded by (seed, step, micro), or each
        example once per epoch in an order shuffled by (seed, epoch)."""
        g_batch, n = self.B * self.world, len(self.train)
        if self.sampling == "random":
            idx = np.random.default_rng([self.seed, step, micro]).integers(0, n, size=g_batch)
        else:
            flat = np.arange(g_batch) + (step * self.accum + micro) * g_batch
            idx = np.array([self._epoch_order(int(i // n))[i % n] for i in flat])
        return idx[self.rank * self.B:(self.rank + 1) * self.B]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.train)))
        return self._order[1]

    def batch(self, step: int, micro: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch([self.train[i] for i in self.indices(step, micro)], device)

    def losses(self, net: torch.nn.Module, device: torch.device, bf16: bool,
               train: bool = True) -> tuple[float, float | None]:
        """(val loss, train loss) on the fixed evaluation examples; the train loss None without `train`."""
        return (masked_loss(net, self.val_batches, device, bf16),
                masked_loss(net, self.train_batches, device, bf16) if train else None)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about its data (lmlab.json)."""
        return {"data_file": str(self.path.resolve()), "data_vocab_size": self.vocab_size,
                "examples": {"train": len(self.train), "val": len(self.val), "dropped": self.dropped}}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
