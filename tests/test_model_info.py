"""`lmlab info MODEL` reads the config alone: it prints the same with the weights gone or unreadable, for our
checkpoints, HF directories and GGUF files (where a tensor nobody can dequantize proves none is dequantized)."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.checkpoint import save_model
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.model import Transformer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def _info(capsys, path) -> str:
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model {path}\n") and "parameters:" in out
    return out


def test_info_on_a_checkpoint_reads_no_weights(tmp_path, capsys):
    cfg = ModelConfig(family="llama", vocab_size=50, context_length=32, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2)
    ckpt = save_model(tmp_path / "ckpt", Transformer(cfg), None)
    before = _info(capsys, ckpt)
    assert f"parameters: {cfg.num_params():,}" in before
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)  # truncated to nothing readable
    assert _info(capsys, ckpt) == before


def test_info_on_an_hf_dir_reads_no_weights(tmp_path, capsys):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path)
    before = _info(capsys, tmp_path)
    assert f"parameters: {sum(p.numel() for p in hf.parameters()):,}" in before
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    assert _info(capsys, tmp_path) == before


def test_info_on_a_gguf_dequantizes_nothing(tmp_path, capsys):
    """A llama3-rope export (its config partly lives in the rope_freqs tensor), rewritten with one norm stored as
    F64, which no dequantizer reads: loading fails, info still prints the exported config."""
    from lmlab.api import load
    from lmlab.errors import LmlabError
    from lmlab.weights.gguf_export import export_gguf

    cfg = ModelConfig(family="llama", vocab_size=64, context_length=64, d_model=32, n_layers=1, n_heads=2,
                      n_kv_heads=1, rope_scaling="llama3", rope_factor=4.0, rope_original_context=64)
    export_gguf(Transformer(cfg), None, tmp_path / "m.gguf")
    before = _info(capsys, tmp_path / "m.gguf")
    assert "rope_scaling           llama3" in before and "rope_original_context  64" in before
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    for field in r.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in r.tensors:
        a = np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape])))
        w.add_tensor(t.name, a.astype(np.float64) if t.name == "blk.0.attn_norm.weight" else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmlabError, match="F64"):
        load(tmp_path / "odd.gguf", device="cpu")
    assert _info(capsys, tmp_path / "odd.gguf").replace("odd.gguf", "m.gguf") == before
