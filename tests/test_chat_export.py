"""Export to HF directories, read back by transformers' AutoModelForCausalLM with the same logits and by
AutoTokenizer with the same ids."""

from __future__ import annotations

import subprocess

import pytest
import torch

import lmlab
from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import BPETokenizer
from lmlab.weights.hf import export_hf
from tests.conftest import corpus_text, lmlab_cmd, subprocess_env

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([corpus_text(30_000)], vocab_size=300)


# ---------------------------------------------------------------------------------------------------------
# Export to HF


def _logits_match(path, lm, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return (hf(x).logits - lm.model(x)).abs().max().item()


def test_export_char_gpt2_without_biases(tmp_path, char_run):
    r = subprocess.run(lmlab_cmd("export", str(char_run), "--format", "hf", "--out", str(tmp_path / "hf")),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    lm = lmlab.load(char_run, device="cpu")
    text = "First Citizen:\nBefore we proceed"
    ids = lm.tokenizer.encode(text)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ref_tok(text)["input_ids"] == ids and ref_tok.decode(ids) == text
    assert _logits_match(tmp_path / "hf", lm, ids) < 1e-5
    assert lmlab.load(tmp_path / "hf", device="cpu").model.num_params() >= lm.model.num_params()


@pytest.mark.parametrize("cfg", [
    dict(family="llama", n_kv_heads=2, tie_embeddings=False),
    dict(family="llama", n_kv_heads=4, tie_embeddings=True, qkv_bias=True),
    dict(family="gpt2", tie_embeddings=False),
], ids=["llama-gqa", "qwen2-style", "gpt2-untied"])
def test_export_bpe_models_round_trip(tmp_path, bpe, cfg):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=bpe.vocab_size, context_length=64, d_model=32, n_layers=2, n_heads=4,
                                    **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = save_model(tmp_path / "ckpt", model, bpe)
    lm = lmlab.load(src, device="cpu")
    export_hf(lm.model, lm.tokenizer, tmp_path / "hf")
    ids = bpe.encode("Before we proceed any further, hear me speak.")
    assert _logits_match(tmp_path / "hf", lm, ids) < 1e-5
    back = lmlab.load(tmp_path / "hf", device="cpu")
    assert back.tokenizer.eos_id == bpe.eos_id and back.tokenizer.encode("hear me") == bpe.encode("hear me")


def test_export_refuses_what_hf_cannot_express(tmp_path, bpe):
    model = Transformer(ModelConfig(family="gpt2", pos="rope", vocab_size=bpe.vocab_size, context_length=16,
                                    d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(LmlabError, match="mixes families"):
        export_hf(model, bpe, tmp_path / "x")


def test_export_into_an_old_export_replaces_it_whole(tmp_path, bpe):
    """An earlier sharded export left model-0000x-of-00002.safetensors and an index: the new export replaces the
    directory, so a load gets the new weights (transformers agrees) and no stale file remains."""
    torch.manual_seed(3)
    cfg = ModelConfig(family="llama", vocab_size=bpe.vocab_size, context_length=32, d_model=32, n_layers=2, n_heads=4)
    old, new = Transformer(cfg), Transformer(cfg)
    out = tmp_path / "hf"
    export_hf(old, bpe, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(out, max_shard_size="20KB")  # the old weights as shards + index
    stale = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in stale and any(n.startswith("model-00001-of-") for n in stale)
    (out / "model.safetensors").unlink()
    export_hf(new, bpe, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    ids = bpe.encode("Before we proceed any further")
    assert _logits_match(out, lmlab.load(out, device="cpu"), ids) < 1e-5
    with torch.no_grad():
        assert (lmlab.load(out, device="cpu").model(torch.tensor([ids])) - new(torch.tensor([ids]))).abs().max() < 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or set-aside directory left


def test_export_refuses_to_replace_a_directory_that_is_not_hf(tmp_path, bpe):
    (tmp_path / "notes.txt").write_text("mine")
    model = Transformer(ModelConfig(family="gpt2", vocab_size=bpe.vocab_size, context_length=16, d_model=16,
                                    n_layers=1, n_heads=2))
    with pytest.raises(LmlabError, match="not an HF checkpoint directory"):
        export_hf(model, bpe, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
