"""Tokenizers behind one small interface: encode(str) -> list[int], decode(list[int]) -> str, eos_id, vocab_size.

Two kinds:
- `CharTokenizer`: one id per distinct character of the training text, as nanoGPT's shakespeare_char.
  It has no end-of-text token (eos_id is None): a character corpus carries no document boundaries.
- `BPETokenizer`: byte-level BPE (GPT-2's scheme, Sennrich et al. 2016 over bytes) as an HF `tokenizers`
  Tokenizer, trained here or read from any `tokenizer.json` (GPT-2, Llama 3, SmolLM2 ...).

Both save to one JSON file and come back through `load_tokenizer(path, meta)`, where `meta` (kept in
checkpoints and data directories) restores the special tokens and chat template of a BPE tokenizer; a
bare file takes <|endoftext|> as EOS when it has that token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from lmlab.errors import LmlabError
from lmlab.utils import read_json

EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    eos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends generation (eos_id first); () when there is none
    bos_id: int | None
    vocab_size: int
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, path: str | os.PathLike) -> None: ...


class CharTokenizer:
    """Character-level: ids are positions in `chars`, the sorted set of characters seen in training."""

    kind = "char"
    eos_id = None
    eos_ids: tuple[int, ...] = ()
    bos_id = None
    chat_template = None

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise LmlabError("char tokenizer: the character list has duplicates; rebuild it with CharTokenizer.train")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise LmlabError("char tokenizer: the training text is empty; give a corpus with some text in it")
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise LmlabError(f"character {e.args[0]!r} is not in this model's {self.vocab_size}-character "
                             "vocabulary; use only characters from its training text") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False), encoding="utf-8")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode in openai/gpt-2 encoder.py): how byte-level BPE
    vocabularies (ours, HF's, GGUF's) spell raw bytes. The one copy: GGUF import and export and the server's
    logprob bytes read it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_DECODER = {ch: b for b, ch in byte_alphabet().items()}  # a byte-level token's characters back to its bytes


class BPETokenizer:
    """Byte-level BPE through HF `tokenizers`: any `tokenizer.json`, or one trained with `train`.

    `extra_eos_ids` are further ids that end generation besides `eos_token`: instruct models stop at the end
    of a turn as well as at the end of text (Llama 3's generation_config.json lists 128001, 128008 and 128009)."""

    kind = "bpe"

    def __init__(self, tok, eos_token: str | None = None, bos_token: str | None = None,
                 chat_template: str | None = None, add_special_tokens: bool = True,
                 extra_eos_ids: Iterable[int] = ()) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.extra_eos_ids = tuple(i for i in dict.fromkeys(extra_eos_ids) if i != self.eos_id)
        self.eos_ids = tuple(i for i in (self.eos_id, *self.extra_eos_ids) if i is not None)
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.chat_template = chat_template
        self.add_special_tokens = add_special_tokens

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> BPETokenizer:
        """GPT-2-style byte-level BPE with one special token, <|endoftext|>, as EOS."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise LmlabError(f"BPE vocab size must be at least 258 (256 bytes + EOS + merges), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=EOT)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)), **kwargs)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise LmlabError(f"cannot read tokenizer file {path}: {str(e).splitlines()[0]}; "
                             "it must be an HF tokenizers JSON file") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        self.tok.save(str(path))

    def meta(self) -> dict:
        """What a checkpoint records beside tokenizer.json to rebuild this object."""
        return {"type": "bpe", "eos_token": self.eos_token, "bos_token": self.bos_token,
                "chat_template": self.chat_template, "add_special_tokens": self.add_special_tokens,
                "extra_eos_ids": list(self.extra_eos_ids)}


def tokenizer_meta(tok: Tokenizer) -> dict:
    return tok.meta() if isinstance(tok, BPETokenizer) else {"type": "char"}


def load_tokenizer(path: str | os.PathLike, meta: dict | None = None) -> Tokenizer:
    """Read a tokenizer file saved by either class (the JSON's shape tells which)."""
    path = Path(path)
    data = read_json(path, "tokenizer file", expect=None)
    if isinstance(data, dict) and data.get("type") == "char":
        if not isinstance(data.get("chars"), str):
            raise LmlabError(f"char tokenizer file {path} has no 'chars' string; re-create it")
        return CharTokenizer(data["chars"])
    if meta is None:  # a bare tokenizer file: our own BPE files carry <|endoftext|> as EOS
        tok = BPETokenizer.from_file(path)
        if tok.tok.token_to_id(EOT) is not None:
            tok = BPETokenizer(tok.tok, eos_token=EOT)
        return tok
    meta = dict(meta)
    meta.pop("type", None)
    return BPETokenizer.from_file(path, **meta)


def tokenizer_sha256(tok: Tokenizer) -> str:
    """A fingerprint of what token ids mean: equal for two tokenizers that give every token the same id, however
    their files are formatted. Data directories record it, so a model is never evaluated on another's ids."""
    if isinstance(tok, CharTokenizer):
        payload = {"char": tok.chars}
    else:
        vocab = tok.tok.get_vocab(with_added_tokens=True)
        payload = {"bpe": sorted(vocab.items(), key=lambda kv: kv[1])}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()
