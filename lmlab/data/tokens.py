"""Text -> token files, and batches from them.

`prepare` streams text files, folders of them, or the built-in `shakespeare` corpus (lmlab/data/sources.py),
trains a tokenizer (char or byte-level BPE), and writes:

    train.bin, val.bin   raw little-endian token arrays (uint16 when the vocabulary fits, else uint32),
                         read back with np.memmap, so a corpus larger than memory trains fine
    tokenizer.json       the tokenizer
    meta.json            dtype, token counts, tokenizer and its fingerprint, each source's sha256: self-describing

Nothing is held whole: the text is read in pieces (a first pass trains the tokenizer: the char alphabet, or BPE
through train_from_iterator; a second encodes and hashes), and ids go to disk in their final dtype as they come,
so memory does not grow with the corpus. The directory is built beside `out` and swapped in whole
(utils.atomic_dir): a killed prepare leaves the previous data, never half of new data.

As nanoGPT does, the split is positional: the first (1 - val_fraction) of the token stream trains, the
rest validates. BPE corpora get an EOS token after each document.

Batches are a pure function of (seed, step, micro-step): a resumed run sees exactly the batches the
uninterrupted one would, and under torchrun each rank takes its own slice of one global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from lmlab.config import PrepareConfig
from lmlab.data.sources import Source, list_sources
from lmlab.errors import LmlabError
from lmlab.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, tokenizer_meta, tokenizer_sha256
from lmlab.utils import atomic_dir, read_json, recover_dir, trim_heap

FORMAT = "lmlab-tokens"
FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def _progress(sources: list[Source], desc: str, quiet: bool):
    from tqdm.auto import tqdm

    total = sum(s.path.stat().st_size for s in sources)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=quiet, leave=False)


def train_tokenizer(sources: list[Source], kind: str, vocab_size: int, quiet: bool) -> Tokenizer:
    """The first pass: a char alphabet, or a BPE tokenizer trained on the pieces as they stream past."""
    has_text = False

    def texts() -> Iterator[str]:
        nonlocal has_text
        with _progress(sources, "reading", quiet or kind == "bpe") as bar:
            for s in sources:
                for piece in s.pieces():
                    has_text = has_text or bool(piece.strip())
                    trim_heap()
                    bar.update(len(piece.encode("utf-8")))
                    yield piece

    if kind == "char":
        seen = {"\n"}  # newline separates documents
        for piece in texts():
            seen.update(piece)
        tok: Tokenizer = CharTokenizer("".join(sorted(seen)))
    else:
        if not quiet:
            print(f"lmlab: training a byte-level BPE tokenizer with {vocab_size} tokens", flush=True)
        tok = BPETokenizer.train(texts(), vocab_size=vocab_size, show_progress=not quiet)
    if not has_text:
        raise LmlabError("the sources hold no text; give files with some content")
    return tok


def _encoder(tok: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    """Texts -> int64 id arrays. Char: a code point table lookup in numpy (a dict per character is 50x slower)."""
    if isinstance(tok, BPETokenizer):
        return lambda texts: [np.asarray(e.ids, dtype=np.int64)
                              for e in tok.tok.encode_batch(texts, add_special_tokens=False)]
    codes = np.array([ord(c) for c in tok.chars])
    table = np.full(codes.max() + 2, -1, dtype=np.int64)  # the last slot: every code point beyond the alphabet
    table[codes] = np.arange(len(codes))

    def encode(texts: list[str]) -> list[np.ndarray]:
        out = []
        for t in texts:
            ids = table[np.minimum(np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32), len(table) - 1)]
            if len(ids) and ids.min() < 0:
                raise LmlabError("a source changed while it was being prepared (a character unseen in the "
                                 "first pass); run lmlab prepare again")
            out.append(ids)
        return out
    return encode


def write_tokens(sources: list[Source], tok: Tokenizer, f, dtype: np.dtype, quiet: bool) -> tuple[int, list[dict]]:
    """The second pass: encode each source piece by piece into the open file `f` (EOS after each document when
    the tokenizer has one, else a newline between documents), hashing as it goes. Returns (tokens, sources)."""
    encode, n, described = _encoder(tok), 0, []
    newline = tok.encode("\n")
    with _progress(sources, "tokenizing", quiet) as bar:
        for s in sources:
            sha, chars, last = hashlib.sha256(), 0, ""
            for piece in s.pieces():
                ids = encode([piece])[0]
                ids.astype(dtype).tofile(f)
                trim_heap()
                n, chars, last = n + len(ids), chars + len(piece), piece
                raw = piece.encode("utf-8")
                sha.update(raw)
                bar.update(len(raw))
            sep: list[int] = []
            if tok.eos_id is not None:
                sep = [tok.eos_id]
            elif s is not sources[-1] and not last.endswith("\n"):  # keep documents apart
                sep = newline
            np.asarray(sep, dtype=dtype).tofile(f)
            n += len(sep)
            described.append({"name": s.name, "chars": chars, "sha256": sha.hexdigest()})
    return n, described


def _split(tmp: Path, n: int, n_train: int, itemsize: int) -> None:
    """tokens.bin -> train.bin (its head, truncated in place) and val.bin (its tail, copied in blocks)."""
    src = tmp / "tokens.bin"
    with open(src, "rb") as f, open(tmp / "val.bin", "wb") as g:
        f.seek(n_train * itemsize)
        shutil.copyfileobj(f, g, 16 << 20)
    os.truncate(src, n_train * itemsize)
    os.replace(src, tmp / "train.bin")


def _check_out(out: Path) -> None:
    """`out` is replaced whole: refuse a directory that holds anything prepare did not write."""
    recover_dir(out)
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--out {out} is a file; give a directory")
    if out.is_dir():
        temporaries = tuple(f".{f}." for f in FILES)  # what a kill of an older, in-place prepare left
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in FILES and not (p.name.startswith(temporaries) and p.name.endswith(".tmp")))
        if others:
            raise LmlabError(f"--out {out} holds files lmlab prepare did not write ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); give a new or empty directory")


def prepare(sources: list[str], out: str | Path, cfg: PrepareConfig | None = None, quiet: bool = False,
            **settings) -> dict:
    """Tokenize the sources into `out` (train.bin, val.bin, tokenizer.json, meta.json) as `cfg` says
    (PrepareConfig's defaults, or its fields as keywords: tokenizer, vocab_size, val_fraction). Returns the meta."""
    import dataclasses

    cfg = dataclasses.replace(cfg or PrepareConfig(), **settings)
    tokenizer, vocab_size, val_fraction = cfg.tokenizer, cfg.vocab_size, cfg.val_fraction
    out = Path(out)
    _check_out(out)
    files = list_sources(sources, quiet=quiet)
    tok = train_tokenizer(files, tokenizer, vocab_size, quiet)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    with atomic_dir(out) as tmp:
        with open(tmp / "tokens.bin", "wb") as f:
            n, described = write_tokens(files, tok, f, dtype, quiet)
        n_train = int(n * (1 - val_fraction))
        _split(tmp, n, n_train, dtype.itemsize)
        tok.save(tmp / "tokenizer.json")
        meta = {
            "format": FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "tokenizer": tokenizer_meta(tok), "tokenizer_file": "tokenizer.json",
            "tokenizer_sha256": tokenizer_sha256(tok),
            "splits": {"train": {"file": "train.bin", "tokens": n_train},
                       "val": {"file": "val.bin", "tokens": n - n_train}},
            "val_fraction": val_fraction, "sources": described,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")  # atomic_dir makes it durable
    return meta


class TokenData:
    """A prepared data directory: memory-mapped splits plus the tokenizer."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        recover_dir(path)  # a prepare killed mid-swap left the previous directory aside: put it back
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


def eval_windows(data: np.ndarray, T: int, batch_size: int, n_batches: int, seed: int) -> list[np.ndarray]:
    """A fixed, deterministic subset of windows for evaluation: the same at every evaluation and on resume."""
    if len(data) < T + 1:
        raise LmlabError(f"the split has {len(data)} tokens, shorter than one context window ({T} + 1); "
                         "use more text, a larger --val-fraction, or a smaller context_length")
    rng = np.random.default_rng([seed, 104729])
    return [rng.integers(0, len(data) - T, size=batch_size) for _ in range(n_batches)]


def subset(src: str | Path, out: str | Path, train_tokens: int, val_tokens: int = 0) -> dict:
    """A data directory with the first `train_tokens` of `src`'s train split and the first `val_tokens` of its val
    split (0: all), under the same tokenizer: a training set small enough for a model to overfit (lmlab study).
    Built beside `out` and swapped in whole, as prepare does. Returns the new meta."""
    data, out = TokenData(src), Path(out)
    _check_out(out)
    with atomic_dir(out) as tmp:
        splits = {}
        for name, n in (("train", train_tokens), ("val", val_tokens)):
            tokens = data.split(name)[:n] if n else data.split(name)
            np.asarray(tokens, dtype=data.dtype).tofile(tmp / f"{name}.bin")
            splits[name] = {"file": f"{name}.bin", "tokens": int(len(tokens))}
        shutil.copyfile(data.path / data.meta.get("tokenizer_file", "tokenizer.json"), tmp / "tokenizer.json")
        meta = {**data.meta, "tokenizer_file": "tokenizer.json", "splits": splits, "subset_of": str(data.path)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta
