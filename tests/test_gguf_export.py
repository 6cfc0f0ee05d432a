"""Export to GGUF: our loader reads the file back with the same logits and tokenizer, and transformers' own GGUF
loader (an implementation nobody here wrote) reads it with the same logits too."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

import lmlab
from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import BPETokenizer, CharTokenizer
from lmlab.weights.gguf import load_gguf
from lmlab.weights.gguf_export import export_gguf
from tests.conftest import corpus_text, lmlab_cmd, subprocess_env

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([corpus_text(30_000)], vocab_size=320)


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(2)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


CASES = {
    "llama-gqa-untied": dict(family="llama", n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "llama-mqa-tied-llama3-rope": dict(family="llama", n_heads=2, n_kv_heads=1, tie_embeddings=True,
                                       rope_scaling="llama3", rope_factor=4.0, rope_original_context=64),
    "gpt2-no-bias": dict(family="gpt2", n_heads=4, bias=False),
    "gpt2-bias-untied": dict(family="gpt2", n_heads=2, tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_through_our_loader(tmp_path, bpe, name, dtype):
    model = _model(ModelConfig(vocab_size=bpe.vocab_size, context_length=64, d_model=32, n_layers=2, **CASES[name]))
    path = export_gguf(model, bpe, tmp_path / "m.gguf", dtype=dtype)
    back, tok = load_gguf(path)
    ids = bpe.encode(TEXT)
    assert tok.encode(TEXT) == ids and tok.decode(ids) == TEXT and tok.eos_id == bpe.eos_id
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (back(x) - model(x)).abs().max().item()
    assert diff < (1e-6 if dtype == "float32" else 2e-2), diff
    assert back.cfg.rope_scaling == model.cfg.rope_scaling


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_reads_our_gguf(tmp_path, bpe, name, dtype):
    """transformers dequantizes and un-permutes our file with its own code (F16 included), reads the tied head
    and Llama 3's rope_freqs: the same logits. (Its GGUF reader ignores gpt2.context_length and sizes GPT-2's
    position table at 1024, so those cases use 1024.)"""
    ctx = 1024 if name.startswith("gpt2") else 64
    model = _model(ModelConfig(vocab_size=bpe.vocab_size, context_length=ctx, d_model=32, n_layers=2, **CASES[name]))
    export_gguf(model, bpe, tmp_path / "m.gguf", dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    if model.cfg.rope_scaling == "llama3":
        hf = _with_llama3_rope(hf, model.cfg, tmp_path / "m.gguf")
    x = torch.tensor([bpe.encode(TEXT)])
    ours = load_gguf(tmp_path / "m.gguf")[0]  # the weights as the file holds them (F16: rounded)
    with torch.no_grad():
        ref = ours(x)
        assert (hf(x).logits - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
        if dtype == "float32":
            assert (ref - model(x)).abs().max().item() < 1e-5


def _with_llama3_rope(hf, cfg: ModelConfig, path):
    """transformers' GGUF reader ignores llama's rope_freqs tensor (as of 5.x), so: check the tensor against
    llama.cpp's converter formula, then give transformers the rope_scaling it encodes and let it compute."""
    from tests.test_gguf import _llama3_factors

    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    expected = _llama3_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_low_freq_factor,
                               cfg.rope_high_freq_factor, cfg.rope_original_context)
    assert np.allclose(np.array(freqs.data), expected, rtol=1e-6)
    c = hf.config
    c.rope_parameters = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                         "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                         "original_max_position_embeddings": cfg.rope_original_context}
    scaled = transformers.LlamaForCausalLM(c).eval()
    scaled.load_state_dict(hf.state_dict())
    return scaled


def test_export_command_on_a_char_model(tmp_path):
    tok = CharTokenizer.train([corpus_text(5_000)])
    model = _model(ModelConfig(family="gpt2", vocab_size=tok.vocab_size, context_length=32, d_model=32, n_layers=1,
                               n_heads=2, bias=False))
    src = save_model(tmp_path / "ckpt", model, tok)
    r = subprocess.run(lmlab_cmd("export", str(src), "--format", "gguf", "--out", str(tmp_path / "c.gguf")),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    lm = lmlab.load(tmp_path / "c.gguf", device="cpu")
    ids = tok.encode("First Citizen:\nBefore")
    assert lm.tokenizer.encode("First Citizen:\nBefore") == ids
    with torch.no_grad():
        assert (lm.model(torch.tensor([ids])) - model(torch.tensor([ids]))).abs().max().item() < 1e-6
    assert lm.generate("First", max_new_tokens=8, temperature=0) == lmlab.load(src).generate(
        "First", max_new_tokens=8, temperature=0)
    bad = subprocess.run(lmlab_cmd("export", str(src), "--format", "gguf", "--out", str(tmp_path / "c.bin")),
                         capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode == 2 and ".gguf" in bad.stderr


def test_export_refuses_what_llama_cpp_cannot_express(tmp_path, bpe):
    qwen = _model(ModelConfig(family="llama", vocab_size=bpe.vocab_size, context_length=16, d_model=16, n_layers=1,
                              n_heads=2, qkv_bias=True))
    with pytest.raises(LmlabError, match="neither"):
        export_gguf(qwen, bpe, tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())


def test_export_is_atomic_and_readable_by_others(tmp_path, bpe):
    """The file appears whole with the umask's mode (0644 under umask 022, as any file the user writes), and a
    failed export leaves the previous file and no temporary."""
    import os

    model = _model(ModelConfig(family="llama", vocab_size=bpe.vocab_size, context_length=16, d_model=16, n_layers=1,
                               n_heads=2))
    old_mask = os.umask(0o022)
    try:
        path = export_gguf(model, bpe, tmp_path / "m.gguf")
    finally:
        os.umask(old_mask)
    assert path.stat().st_mode & 0o777 == 0o644
    before = path.read_bytes()
    with pytest.raises(LmlabError):
        export_gguf(model, bpe, path, dtype="int4")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
