"""CharTokenizer and BPETokenizer: round trips, save/load, errors, and BPE ids checked against two other encoders.

The BPE tokenizer is trained inside the test on a small generated corpus (hermetic); one more check runs on
tinyshakespeare from the shared data folder when it is there. Its ids are compared with HF transformers'
`PreTrainedTokenizerFast` reading the saved file, and with a from-scratch Python implementation of GPT-2's
byte-level BPE (bytes -> unicode table, GPT-2's split regex, merges applied lowest rank first).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmlab.checkpoint import load_model, save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import EOT, BPETokenizer, CharTokenizer, load_tokenizer

SHAKESPEARE = Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"
BPE_VOCAB = 400

WORDS = ("the", "king", "queen", "shall", "not", "be", "moved", "thou", "art", "more", "lovely", "and", "temperate",
         "we", "they'll", "I'm", "you've", "it's", "café", "naïve", "über", "rôle", "señor", "2024", "42", "3.14",
         "x=y+1;", "(yes)", "—", "“quoted”", "hello", "world", "forty-two", "a", "an", "of", "to", "in")


def make_corpus(n_words: int = 3000, seed: int = 0) -> str:
    """A few KB of word salad with punctuation, digits, accents, newlines and runs of spaces."""
    rng = random.Random(seed)
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice([" "] * 12 + [", ", ".\n", "  ", "\n\n", "! ", "\t"]))
        if i % 97 == 0:
            parts.append(rng.choice(["ok", "no"]))
    return "".join(parts)


CORPUS = make_corpus()
SAMPLES = [
    "héllo wörld ✓ 日本",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n and   runs   of spaces",
    "digits 1234567890 and 3.14159, emoji 🙂🚀, math ∑∫√, accents àéîõü, Ελληνικά, русский, 中文, 한국어",
    "they'll we're I'd it's 'quoted' \"double\"",
    CORPUS[:500],
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB)


@pytest.fixture(scope="module")
def bpe_file(bpe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# CharTokenizer


def test_char_ids_are_positions_in_the_sorted_alphabet():
    text = "hello world\nhow are you?"
    tok = CharTokenizer.train([text])
    alphabet = "".join(sorted(set(text)))
    assert tok.vocab_size == len(alphabet)
    assert tok.encode(alphabet) == list(range(len(alphabet)))
    assert tok.eos_id is None and tok.bos_id is None
    # Several texts train one alphabet: their union.
    assert CharTokenizer.train(["ab", "ba", "c"]).encode("abc") == [0, 1, 2]


@pytest.mark.parametrize("text", ["hello world\nhow are you?", CORPUS, "héllo wörld ✓ 日本"])
def test_char_round_trip(text):
    tok = CharTokenizer.train([text])
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_save_load(tmp_path):
    text = CORPUS + "héllo wörld ✓ 日本"
    tok = CharTokenizer.train([text])
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = load_tokenizer(path)
    assert isinstance(back, CharTokenizer)
    assert back.vocab_size == tok.vocab_size
    assert back.eos_id is None
    assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(text)) == text


@pytest.mark.parametrize("unknown", ["Z", "✓", "\t"])
def test_char_unknown_character_is_named(unknown):
    tok = CharTokenizer.train(["abc def"])
    with pytest.raises(LmlabError) as err:
        tok.encode(f"ab{unknown}c")
    assert repr(unknown) in str(err.value)
    assert f"{tok.vocab_size}-character" in str(err.value)


def test_char_bad_construction():
    with pytest.raises(LmlabError, match="empty"):
        CharTokenizer.train(["", ""])
    with pytest.raises(LmlabError, match="duplicates"):
        CharTokenizer("abca")


# ---------------------------------------------------------------------------------------------------------
# BPETokenizer


def test_bpe_vocab_and_eos(bpe):
    assert bpe.vocab_size == BPE_VOCAB
    assert bpe.eos_id is not None
    assert bpe.eos_id == bpe.tok.token_to_id(EOT)
    assert bpe.decode([bpe.eos_id]) == EOT
    # EOT in text is the special token, one id, not its characters.
    assert bpe.encode(f"a{EOT}b") == bpe.encode("a") + [bpe.eos_id] + bpe.encode("b")


def test_bpe_learned_merges(bpe):
    """Training did merge: frequent words of the corpus take fewer tokens than they have bytes."""
    for word in (" the", " king", " queen"):
        assert len(bpe.encode(word)) < len(word.encode("utf-8"))
    assert len(bpe.encode(CORPUS)) < 0.5 * len(CORPUS.encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES + [CORPUS])
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_covers_every_byte(bpe):
    """Byte-level: characters never seen in training still encode (as bytes) and decode back."""
    text = "".join(chr(c) for c in range(1, 0x250)) + "日本語 ✓ 🙂"
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_save_load_with_meta(bpe, bpe_file):
    """The checkpoint's way: tokenizer.json plus the meta recorded beside it."""
    back = load_tokenizer(bpe_file, bpe.meta())
    assert isinstance(back, BPETokenizer)
    assert back.vocab_size == bpe.vocab_size
    assert back.eos_id == bpe.eos_id == back.tok.token_to_id(EOT)
    for text in SAMPLES + [EOT + "x"]:
        assert back.encode(text) == bpe.encode(text)


def test_bpe_save_load_ids_and_vocab(bpe, bpe_file):
    back = load_tokenizer(bpe_file)
    assert isinstance(back, BPETokenizer)
    assert back.vocab_size == bpe.vocab_size
    for text in SAMPLES:
        assert back.encode(text) == bpe.encode(text)
        assert back.decode(bpe.encode(text)) == text


def test_bpe_save_load_keeps_eos_without_meta(bpe, bpe_file):
    assert load_tokenizer(bpe_file).eos_id == bpe.eos_id


def test_bpe_checkpoint_keeps_eos(bpe, tmp_path):
    cfg = ModelConfig(family="llama", vocab_size=bpe.vocab_size, context_length=8, d_model=8, d_ff=16, n_layers=1,
                      n_heads=2)
    save_model(tmp_path / "ckpt", Transformer(cfg), bpe)
    _, tok, _ = load_model(tmp_path / "ckpt", torch.device("cpu"), torch.float32)
    assert tok.eos_id == bpe.eos_id
    assert tok.vocab_size == bpe.vocab_size
    assert tok.encode(SAMPLES[0]) == bpe.encode(SAMPLES[0])


def test_bpe_vocab_size_too_small():
    with pytest.raises(LmlabError, match="258"):
        BPETokenizer.train(["abc"], vocab_size=100)


# ---------------------------------------------------------------------------------------------------------
# Malformed tokenizer files


@pytest.mark.parametrize(("content", "words"), [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
    (b'{"type": "char"}', "has no 'chars' string"),
    (b'{"type": "char", "chars": 42}', "has no 'chars' string"),
    (b'{"type": "char", "chars": "abca"}', "has duplicates"),
    (b'{"hello": "world"}', "must be an HF tokenizers JSON file"),
    (b"[1, 2, 3]", "must be an HF tokenizers JSON file"),
    (b'{"model": {"type": "BPE", "vocab": 5}}', "must be an HF tokenizers JSON file"),
], ids=["bad-json", "not-utf8", "char-no-chars", "char-chars-not-str", "char-duplicates", "unknown-dict",
        "json-list", "broken-bpe"])
def test_malformed_file_is_an_lmlab_error(tmp_path, content, words):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(LmlabError) as err:
        load_tokenizer(path)
    assert words in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_missing_file_is_an_lmlab_error(tmp_path):
    with pytest.raises(LmlabError) as err:
        load_tokenizer(tmp_path / "nope.json")
    assert str(err.value) == f"tokenizer file {tmp_path / 'nope.json'} not found"


# ---------------------------------------------------------------------------------------------------------
# The ids against other encoders


def test_bpe_ids_match_transformers(bpe, bpe_file):
    transformers = pytest.importorskip("transformers")
    for hf in (transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_file), eos_token=EOT),
               transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token=EOT)):
        assert hf.eos_token_id == bpe.eos_id
        assert len(hf) == bpe.vocab_size
        for text in SAMPLES + [CORPUS]:
            assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the rest to unused code points from 256 on."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ReferenceBPE:
    """GPT-2's encoder.py algorithm over the vocab and merges of a saved tokenizer.json."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, path: Path) -> None:
        regex = pytest.importorskip("regex")
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        assert model["type"] == "BPE"
        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.split = regex.compile(self.PATTERN)

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:], strict=False))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.split.findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self.bpe(word))
        return ids


def test_bpe_ids_match_reference_python_bpe(bpe, bpe_file):
    ref = ReferenceBPE(bpe_file)
    for text in SAMPLES + [CORPUS]:
        assert ref.encode(text) == bpe.encode(text), text[:60]


def test_bpe_on_tinyshakespeare(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    train, held_out = text[:100_000], text[-5_000:]
    tok = BPETokenizer.train([train], vocab_size=512)
    assert tok.vocab_size == 512
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    ref = ReferenceBPE(path)
    back = load_tokenizer(path, tok.meta())
    for sample in (train[:20_000], held_out):
        ids = tok.encode(sample)
        assert tok.decode(ids) == sample
        assert ref.encode(sample) == ids
        assert back.encode(sample) == ids
    assert back.eos_id == tok.eos_id
