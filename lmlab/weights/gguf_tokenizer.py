"""The tokenizer inside a GGUF file's metadata, rebuilt as an HF `tokenizers.Tokenizer`.

tokenizer.ggml.model "gpt2" is byte-level BPE: tokens spelled in GPT-2's byte alphabet, merges in rank order,
and tokenizer.ggml.pre naming how text is split into pieces before the merges apply. The rebuild follows
transformers' GGUF integration (integrations/gguf/gguf_tokenizer_mapping.py), so both encode a text to the
same ids; the split regexes are llama.cpp's (src/llama-vocab.cpp, `llm_tokenizer_bpe`).
"""

from __future__ import annotations

from typing import Any

from lmlab.errors import LmlabError
from lmlab.tokenizer import byte_alphabet

SUPPORTED_TOKENIZERS = ("gpt2",)

# How each tokenizer.ggml.pre value splits text into pieces before the merges apply, from llama.cpp's
# llama-vocab.cpp (the name -> LLAMA_VOCAB_PRE_TYPE_* table in `load`, the regexes in `llm_tokenizer_bpe`).
# A value not listed is refused: guessing GPT-2's split would silently give other ids than llama.cpp.
#   GPT-2's own split (tokenizers' ByteLevel regex). "gpt2" is what lmlab's exporter wrote before it wrote
#   llama.cpp's "gpt-2"; those files were GPT-2-split byte-level BPE.
GPT2_SPLIT_NAMES = ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
                    "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling", "gpt2")
#   every digit on its own first ("\p{N}"), then GPT-2's split: SmolLM, StarCoder and kin
DIGITS_GPT2_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
#   one split regex, then byte-level without GPT-2's regex (as transformers' GGUF integration builds them)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"),
                    _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

KNOWN_PRE_TOKENIZERS = (*GPT2_SPLIT_NAMES, *DIGITS_GPT2_NAMES, *PRE_TOKENIZER_SPLITS)
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def pre_tokenizer(name: str | None, source: str):
    """The HF pre-tokenizer for a tokenizer.ggml.pre value, or an error naming a value we do not know."""
    from tokenizers import Regex, pre_tokenizers

    if name in PRE_TOKENIZER_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[name]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if name in GPT2_SPLIT_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if name in DIGITS_GPT2_NAMES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    what = "names no pre-tokenizer (tokenizer.ggml.pre is missing)" if name is None else \
        f"has tokenizer.ggml.pre = {name!r}, a pre-tokenizer lmlab does not know"
    raise LmlabError(f"{source} {what}; splitting its text as GPT-2 does could give other tokens than llama.cpp, "
                     f"so it is refused. Known: {', '.join(sorted(KNOWN_PRE_TOKENIZERS))}")


def pre_tokenizer_name(tok) -> str:
    """The tokenizer.ggml.pre value that splits text as the HF tokenizer `tok` does (for export), or an error."""
    import json

    def canon(spec: Any) -> Any:  # trim_offsets changes offsets, not the pieces
        if isinstance(spec, dict):
            return {k: canon(v) for k, v in spec.items() if k != "trim_offsets"}
        return [canon(v) for v in spec] if isinstance(spec, list) else spec

    ours = canon(json.loads(tok.to_str()).get("pre_tokenizer"))
    for name in ("gpt-2", "smollm", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"):
        if canon(json.loads(pre_tokenizer(name, "").__getstate__())) == ours:
            return name
    raise LmlabError("this tokenizer splits text in a way no llama.cpp pre-tokenizer name describes; a GGUF file "
                     "would be tokenized differently by llama.cpp, so export to HF instead (--format hf)")


def gguf_tokenizer(f):
    """The tokenizer a GGUFFile's metadata describes, as a BPETokenizer; None when the file has no tokenizer."""
    from tokenizers import decoders

    from lmlab.tokenizer import BPETokenizer

    kind = f.meta("tokenizer.ggml.model", None)
    if kind is None:
        return None
    if kind not in SUPPORTED_TOKENIZERS:
        raise LmlabError(f"{f.path}: tokenizer model {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE)")
    tokens = f.meta("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise LmlabError(f"{f.path}: tokenizer.ggml.tokens must be a list of strings")
    tok, vocab = _bpe(f, tokens)
    tok.pre_tokenizer = pre_tokenizer(f.meta("tokenizer.ggml.pre", None), str(f.path))
    tok.decoder = decoders.ByteLevel()
    _add_tokens(tok, tokens, f.meta("tokenizer.ggml.token_type", []), vocab)
    named = _special_tokens(f, tok, tokens)
    bos, eos = named["bos_token_id"], named["eos_token_id"]
    add_bos = bool(f.meta("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(f.meta("tokenizer.ggml.add_eos_token", False)) and eos is not None
    tok.post_processor = _post_processor(tok, [bos] if add_bos else [], [eos] if add_eos else [])
    template = f.meta("tokenizer.chat_template", None)
    return BPETokenizer(tok, eos_token=eos, bos_token=bos,
                        chat_template=template if isinstance(template, str) else None,
                        extra_eos_ids=_end_of_turn_ids(f, len(tokens)))


def _end_of_turn_ids(f, n_tokens: int) -> list[int]:
    """End-of-turn and end-of-message ids, which llama.cpp treats as end of generation like EOS (llama_vocab_is_eog):
    an instruct model stops at the end of its turn."""
    ids = (f.meta(f"tokenizer.ggml.{key}", None) for key in ("eot_token_id", "eom_token_id"))
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_tokens]


def _bpe(f, tokens: list[str]):
    """(the BPE model as a Tokenizer, its vocabulary). A token outside the byte alphabet is stored as plain
    text: it is spelled as its UTF-8 bytes, as transformers does."""
    from tokenizers import Tokenizer, models

    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = f.meta("tokenizer.ggml.merges", [])
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    except Exception as e:
        raise LmlabError(f"{f.path}: the tokenizer's vocabulary or merges are malformed ({e})") from None
    return Tokenizer(bpe), vocab


def _add_tokens(tok, tokens: list[str], types: list[int], vocab: dict[str, int]) -> None:
    """Control tokens (<|im_start|> ...) are special and matched whole; one spelled outside the byte alphabet is
    a llama.cpp mislabel and is skipped. User-defined ones (<think>) are matched whole but are not special."""
    from tokenizers import AddedToken

    alphabet = set(byte_alphabet().values())
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types, strict=False)
               if ty == _CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=False)
            if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def _special_tokens(f, tok, tokens: list[str]) -> dict[str, Any]:
    """bos/eos/unk/pad by name (None when absent), registered as special tokens as transformers does."""
    from tokenizers import AddedToken

    def special(key: str) -> str | None:
        i = f.meta(f"tokenizer.ggml.{key}", None)
        if i is None:
            return None
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
            raise LmlabError(f"{f.path}: tokenizer.ggml.{key} = {i!r} is not a token id below {len(tokens)}")
        return tokens[i]

    named = {key: special(key) for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")}
    have = {str(t) for t in tok.get_added_tokens_decoder().values()}
    extra = [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named.values())
             if t is not None and t not in have]
    if extra:
        tok.add_special_tokens(extra)
    return named


def _post_processor(tok, first: list[str], last: list[str]):
    """What encode() adds around a text (BOS before, EOS after, as the metadata's add_*_token say)."""
    from tokenizers import processors

    single = " ".join([*(f"{t}:0" for t in first), "$A:0", *(f"{t}:0" for t in last)])
    pair = " ".join([single, *(f"{t}:1" for t in first), "$B:1", *(f"{t}:1" for t in last)])
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(first + last)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
