"""Export: our model -> one GGUF file that llama.cpp (and transformers' GGUF loader, and ours) reads.

The key-map tables of weights/gguf.py are read backwards: q and k rows get llama.cpp's permutation back, Llama
3's rope scaling becomes the rope_freqs tensor, and the tokenizer becomes tokenizer.ggml.* metadata.
Reference: llama.cpp convert_hf_to_gguf.py (what a file from the official converter holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.tokenizer import byte_alphabet
from lmlab.weights.gguf import GGUF_GPT2_KEYS, keymaps
from lmlab.weights.gguf_tokenizer import pre_tokenizer_name


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Our weights under GGUF names, through the key-map table read backwards (float32 arrays)."""
    arrays = {k: v.detach().cpu().float().numpy() for k, v in state.items()}
    out = {k: np.ascontiguousarray(v) for k, v in keymaps()[cfg.family].export(cfg, arrays).items()}
    if cfg.family == "gpt2" and not cfg.bias:  # llama.cpp's gpt2 graph always has biases: zeros change nothing
        for _, theirs, _ in GGUF_GPT2_KEYS:
            for n in theirs:
                for i in range(cfg.n_layers):
                    name = n.format(i=i)
                    if name.endswith(".bias") and name not in out:
                        out[name] = np.zeros(out[name.replace(".bias", ".weight")].shape[0], dtype=np.float32)
    if cfg.family == "llama" and cfg.rope_scaling == "llama3":  # llama.cpp keeps it as per-frequency divisors
        from lmlab.model import rope_inv_freq

        plain = rope_inv_freq(cfg.replace(rope_scaling="none"))
        out["rope_freqs.weight"] = (plain / rope_inv_freq(cfg)).numpy().astype(np.float32)
    return out


def _check_exportable(cfg: ModelConfig) -> str:
    if cfg.family == "llama" and (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu") and not (
            cfg.bias or cfg.qkv_bias):
        return "llama"
    if cfg.family == "gpt2" and (cfg.pos, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu") and \
            cfg.n_kv_heads == cfg.n_heads and cfg.qkv_bias == cfg.bias:
        return "gpt2"
    raise LmlabError("GGUF export covers llama.cpp's llama architecture (rope, rmsnorm, swiglu, no biases) and its "
                     "gpt2 architecture (learned positions, layernorm, gelu, no GQA); this model is neither")


def _tokenizer_fields(tokenizer) -> dict[str, Any] | None:
    """tokenizer.ggml.* values for a byte-level BPE tokenizer, or a character tokenizer spelled as one."""
    import json

    from lmlab.tokenizer import BPETokenizer, CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        spelling = byte_alphabet()
        if any(ord(c) > 127 for c in tokenizer.chars):
            raise LmlabError("a character tokenizer with non-ASCII characters cannot be written as GGUF's byte-level "
                             "BPE; export to HF instead (--format hf)")
        # One byte per character and no merges: byte-level BPE then gives exactly the character ids.
        return {"tokens": [spelling[ord(c)] for c in tokenizer.chars], "merges": [],
                "types": [1] * len(tokenizer.chars), "pre": "gpt-2", "bos": None, "eos": None, "add_bos": False,
                "template": None}
    if not isinstance(tokenizer, BPETokenizer):
        return None
    spec = json.loads(tokenizer.tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LmlabError(f"GGUF export needs a BPE tokenizer, this one is {model.get('type')!r}")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = spec.get("post_processor") or {}
    add_bos = bool(tokenizer.bos_token) and tokenizer.bos_token in json.dumps(post.get("single", ""))
    return {"tokens": tokens, "merges": merges, "types": [3 if t in special else 1 for t in tokens],
            "pre": pre_tokenizer_name(tokenizer.tok),
            "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "add_bos": add_bos, "template": tokenizer.chat_template}


def export_gguf(model, tokenizer, out: str | Path, dtype: str = "float32") -> Path:
    """Write `model` (+ its tokenizer) as one GGUF file, F32 or F16 (norms and biases stay F32, as llama.cpp
    keeps them), with the `gguf` package's writer. The file is written beside `out`, made durable and renamed
    into place with the umask's mode (utils.atomic_file): readers see the old file or the new one."""
    from gguf import GGUFWriter

    from lmlab.utils import atomic_file

    if dtype not in ("float32", "float16"):
        raise LmlabError(f"GGUF export writes float32 or float16, not {dtype!r}")
    cfg = model.cfg
    arch = _check_exportable(cfg)
    tensors = gguf_tensors(cfg, model.state_dict())
    tok = _tokenizer_fields(tokenizer) if tokenizer is not None else None
    with atomic_file(out) as tmp:
        w = GGUFWriter(tmp, arch)
        write_config(w, cfg, arch, 1 if dtype == "float16" else 0)  # llama_ftype: ALL_F32 = 0, MOSTLY_F16 = 1
        if tok is not None:
            write_tokenizer(w, tok)
        for name, a in tensors.items():
            w.add_tensor(name, a.astype(np.float16) if dtype == "float16" and a.ndim >= 2 else a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


def write_config(w, cfg: ModelConfig, arch: str, file_type: int, name: str = "lmlab export") -> None:
    """The `{arch}.*` metadata llama.cpp reads the architecture from, and general.file_type (a llama_ftype).
    benchmarks/synthetic_gguf.py writes its quantized files' metadata with it too."""
    w.add_name(name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    if arch == "llama":
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    w.add_file_type(file_type)


def write_tokenizer(w, tok: dict[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    if tok["bos"] is not None:
        w.add_bos_token_id(tok["bos"])
    if tok["eos"] is not None:
        w.add_eos_token_id(tok["eos"])
    w.add_add_bos_token(tok["add_bos"])
    if tok["template"]:
        w.add_chat_template(tok["template"])
