"""HF transformers checkpoint directories: config.json + *.safetensors (sharded or not) + tokenizer.json.

Supported: GPT2LMHeadModel (model_type gpt2), LlamaForCausalLM (llama) and Qwen2ForCausalLM (qwen2: Llama
with q/k/v biases). Weights map onto our module names through the tables below: one row per parameter
of ours, naming the HF tensors it is built from and how (GPT-2's Conv1D stores weights transposed; HF
Llama keeps q, k and v apart while we fuse them into one matmul).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lmlab.checkpoint import load_converted
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.utils import read_json
from lmlab.weights.keymap import KeyMap, Row
from lmlab.weights.safetensors_dir import SafetensorsReader


def _same(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _cat(cfg: ModelConfig, *ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _split_qkv(cfg: ModelConfig, t: torch.Tensor) -> list[torch.Tensor]:
    D = cfg.head_dim
    return [p.contiguous() for p in t.split([cfg.n_heads * D, cfg.n_kv_heads * D, cfg.n_kv_heads * D], dim=0)]


INVERSES = {_same: lambda cfg, t: [t], _transpose: lambda cfg, t: [t.t().contiguous()], _cat: _split_qkv}

# (our key, HF keys it is built from, transform). "{i}" is the layer index.
GPT2_KEYS: list[Row] = [
    ("wte.weight", ("transformer.wte.weight",), _same),
    ("wpe.weight", ("transformer.wpe.weight",), _same),
    ("blocks.{i}.norm1.weight", ("transformer.h.{i}.ln_1.weight",), _same),
    ("blocks.{i}.norm1.bias", ("transformer.h.{i}.ln_1.bias",), _same),
    ("blocks.{i}.attn.qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",), _transpose),
    ("blocks.{i}.attn.qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",), _same),
    ("blocks.{i}.attn.proj.weight", ("transformer.h.{i}.attn.c_proj.weight",), _transpose),
    ("blocks.{i}.attn.proj.bias", ("transformer.h.{i}.attn.c_proj.bias",), _same),
    ("blocks.{i}.norm2.weight", ("transformer.h.{i}.ln_2.weight",), _same),
    ("blocks.{i}.norm2.bias", ("transformer.h.{i}.ln_2.bias",), _same),
    ("blocks.{i}.mlp.up.weight", ("transformer.h.{i}.mlp.c_fc.weight",), _transpose),
    ("blocks.{i}.mlp.up.bias", ("transformer.h.{i}.mlp.c_fc.bias",), _same),
    ("blocks.{i}.mlp.down.weight", ("transformer.h.{i}.mlp.c_proj.weight",), _transpose),
    ("blocks.{i}.mlp.down.bias", ("transformer.h.{i}.mlp.c_proj.bias",), _same),
    ("norm_f.weight", ("transformer.ln_f.weight",), _same),
    ("norm_f.bias", ("transformer.ln_f.bias",), _same),
    ("lm_head.weight", ("lm_head.weight",), _same),
]

_L = "model.layers.{i}."
LLAMA_KEYS: list[Row] = [
    ("wte.weight", ("model.embed_tokens.weight",), _same),
    ("blocks.{i}.norm1.weight", (_L + "input_layernorm.weight",), _same),
    ("blocks.{i}.attn.qkv.weight", tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), _cat),
    ("blocks.{i}.attn.qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), _cat),
    ("blocks.{i}.attn.proj.weight", (_L + "self_attn.o_proj.weight",), _same),
    ("blocks.{i}.attn.proj.bias", (_L + "self_attn.o_proj.bias",), _same),
    ("blocks.{i}.norm2.weight", (_L + "post_attention_layernorm.weight",), _same),
    ("blocks.{i}.mlp.gate.weight", (_L + "mlp.gate_proj.weight",), _same),
    ("blocks.{i}.mlp.gate.bias", (_L + "mlp.gate_proj.bias",), _same),
    ("blocks.{i}.mlp.up.weight", (_L + "mlp.up_proj.weight",), _same),
    ("blocks.{i}.mlp.up.bias", (_L + "mlp.up_proj.bias",), _same),
    ("blocks.{i}.mlp.down.weight", (_L + "mlp.down_proj.weight",), _same),
    ("blocks.{i}.mlp.down.bias", (_L + "mlp.down_proj.bias",), _same),
    ("norm_f.weight", ("model.norm.weight",), _same),
    ("lm_head.weight", ("lm_head.weight",), _same),
]

KEYMAPS = {"gpt2": KeyMap(GPT2_KEYS, INVERSES), "llama": KeyMap(LLAMA_KEYS, INVERSES)}


def map_weights(cfg: ModelConfig, our_keys: list[str], get: Callable[[str], torch.Tensor | None],
                source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, tensor) for each key, built from HF tensors fetched with `get(key)` (None when absent), one at
    a time so a caller converting each as it comes never holds two copies of the model."""
    def missing(name: str) -> LmlabError:
        return LmlabError(f"{source}: checkpoint lacks tensor {name!r} that this {cfg.family} config needs; the "
                          "file is incomplete or the config mismatched")

    return KEYMAPS[cfg.family].load(cfg, our_keys, get, missing)


# ---------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _rope(d: dict) -> dict:
    """Rope settings from either the transformers 5 `rope_parameters` or the older top-level fields."""
    params = dict(d.get("rope_scaling") or {})
    params.update(d.get("rope_parameters") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_context=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        raise LmlabError(f"rope scaling type {kind!r} is not supported; supported: default, llama3")
    return out


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Translate an HF config.json into our ModelConfig, refusing options our model would get wrong."""
    model_type = d.get("model_type")
    try:
        if model_type == "gpt2":
            act = d.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise LmlabError(f"{source}: GPT-2 activation {act!r} is not supported; only gelu_new (tanh GELU)")
            if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn") or \
                    d.get("scale_attn_weights") is False:
                raise LmlabError(f"{source}: GPT-2 attention scaling variants are not supported")
            return ModelConfig(
                family="gpt2", vocab_size=d["vocab_size"], context_length=d["n_positions"], d_model=d["n_embd"],
                d_ff=d.get("n_inner") or 4 * d["n_embd"], n_layers=d["n_layer"], n_heads=d["n_head"],
                norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_embeddings=d.get("tie_word_embeddings", True),
                dropout_embed=d.get("embd_pdrop", 0.1), dropout_attn=d.get("attn_pdrop", 0.1),
                dropout_resid=d.get("resid_pdrop", 0.1))
        if model_type in ("llama", "qwen2", "mistral"):
            if d.get("hidden_act", "silu") != "silu":
                raise LmlabError(f"{source}: activation {d['hidden_act']!r} is not supported; only silu (SwiGLU)")
            n_heads = d["num_attention_heads"]
            if d.get("head_dim") not in (None, d["hidden_size"] // n_heads):
                raise LmlabError(f"{source}: head_dim {d['head_dim']} != hidden_size / num_attention_heads is "
                                 "not supported")
            if d.get("use_sliding_window") or (model_type == "mistral" and d.get("sliding_window")):
                raise LmlabError(f"{source}: sliding-window attention is not supported")
            if model_type == "qwen2":
                bias, qkv_bias = False, True
            else:
                bias = bool(d.get("attention_bias", False))
                if bool(d.get("mlp_bias", False)) != bias:
                    raise LmlabError(f"{source}: attention_bias and mlp_bias must agree to be loaded here")
                qkv_bias = bias
            return ModelConfig(
                family="llama", vocab_size=d["vocab_size"], context_length=d.get("max_position_embeddings", 2048),
                d_model=d["hidden_size"], d_ff=d["intermediate_size"], n_layers=d["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads, bias=bias, qkv_bias=qkv_bias,
                norm_eps=d.get("rms_norm_eps", 1e-6), tie_embeddings=d.get("tie_word_embeddings", False),
                dropout_attn=d.get("attention_dropout", 0.0), **_rope(d))
    except KeyError as e:
        raise LmlabError(f"{source}: missing field {e.args[0]!r} for model_type {model_type!r}") from None
    except TypeError as e:
        raise LmlabError(f"{source}: a field has the wrong type ({e})") from None
    raise LmlabError(f"{source}: model_type {model_type!r} is not supported; supported: gpt2, llama, qwen2, mistral")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def hf_dir_config(path: Path) -> ModelConfig:
    """The ModelConfig of an HF checkpoint directory, from its config.json alone."""
    return config_from_hf(read_json(path / "config.json", "HF config"), str(path / "config.json"))


def load_hf_dir(path: Path, device: torch.device, dtype: torch.dtype):
    """An HF checkpoint directory -> (Transformer in eval mode, tokenizer or None)."""
    from lmlab.model import Transformer

    cfg = hf_dir_config(path)
    reader = SafetensorsReader(path)
    prefix_free = {"gpt2": "transformer.", "llama": "model."}[cfg.family]

    def get(key: str) -> torch.Tensor | None:  # in the final dtype as read: one tensor at a time, no copy of all
        t = reader.get(key, dtype)
        if t is None and key.startswith(prefix_free):  # a base model (GPT2Model) saves without the prefix
            t = reader.get(key[len(prefix_free):], dtype)
        return t

    with torch.device("meta"):
        model = Transformer(cfg)
    pairs = map_weights(cfg, list(model.state_dict()), get, str(path))
    load_converted(model, pairs, device, dtype, str(path), "config.json")
    return model, hf_tokenizer(path)


def hf_tokenizer(path: Path):
    """tokenizer.json with its special tokens and chat template from tokenizer_config.json, or None."""
    from lmlab.tokenizer import BPETokenizer

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}

    def token(v):
        return v.get("content") if isinstance(v, dict) else v

    template = tc.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    tok = BPETokenizer.from_file(tok_file, eos_token=token(tc.get("eos_token")), bos_token=token(tc.get("bos_token")),
                                 chat_template=template if isinstance(template, str) else None)
    gen = path / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
    eos = [eos] if isinstance(eos, int) else eos or []  # HF generate stops at every one of these ids
    if not isinstance(eos, list) or not all(type(i) is int for i in eos):
        raise LmlabError(f"{gen}: eos_token_id must be a token id or a list of them, got {eos!r}")
    eos = [i for i in eos if 0 <= i < tok.vocab_size]  # save_pretrained may leave a config default beyond the vocab
    if eos:
        tok = BPETokenizer(tok.tok, eos_token=tok.eos_token or tok.tok.id_to_token(eos[0]), bos_token=tok.bos_token,
                           chat_template=tok.chat_template, extra_eos_ids=eos)
    return tok


# ---------------------------------------------------------------------------------------------------------
# Export: our model -> an HF directory that AutoModelForCausalLM.from_pretrained reads.


def hf_config(cfg: ModelConfig, tokenizer=None) -> dict:
    """config.json for the HF class that computes what our model computes, or an error saying why none does."""
    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        if cfg.n_kv_heads != cfg.n_heads or cfg.qkv_bias != cfg.bias:
            raise LmlabError("this GPT-2-family model uses grouped-query attention or q/k/v-only biases, which HF's "
                             "GPT2LMHeadModel cannot express; it cannot be exported to HF")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.context_length, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout_resid, "embd_pdrop": cfg.dropout_embed, "attn_pdrop": cfg.dropout_attn,
                "torch_dtype": "float32", **special}
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        qwen = cfg.qkv_bias and not cfg.bias
        out = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
               "model_type": "qwen2" if qwen else "llama", "vocab_size": cfg.vocab_size,
               "max_position_embeddings": cfg.context_length, "hidden_size": cfg.d_model,
               "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
               "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
               "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
               "attention_dropout": cfg.dropout_attn, "torch_dtype": "float32", **special}
        if not qwen:
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        if cfg.rope_scaling == "llama3":
            out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                                   "low_freq_factor": cfg.rope_low_freq_factor,
                                   "high_freq_factor": cfg.rope_high_freq_factor,
                                   "original_max_position_embeddings": cfg.rope_original_context}
        return out
    raise LmlabError(f"this model mixes families (pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp}); HF has no class "
                     "for it, so it cannot be exported to HF")


def to_hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under HF names, through the same key-map table read backwards. A GPT-2-family model
    trained without biases gets zero biases, which HF's GPT-2 always has and which change nothing."""
    out = KEYMAPS[cfg.family].export(cfg, {k: v.detach().cpu().float() for k, v in state.items()})
    out = {k: v.contiguous() for k, v in out.items()}
    if cfg.family == "gpt2" and not cfg.bias:
        for i in range(cfg.n_layers):
            h = f"transformer.h.{i}."
            for name, size in (("ln_1.bias", cfg.d_model), ("ln_2.bias", cfg.d_model),
                               ("attn.c_proj.bias", cfg.d_model), ("mlp.c_fc.bias", cfg.d_ff),
                               ("mlp.c_proj.bias", cfg.d_model), ("attn.c_attn.bias", 3 * cfg.d_model)):
                out.setdefault(h + name, torch.zeros(size))
        out.setdefault("transformer.ln_f.bias", torch.zeros(cfg.d_model))
    return out


def export_hf(model, tokenizer, out: Path) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json as the directory `out`.

    The directory is built beside `out` and swapped in whole (utils.atomic_dir): an earlier export's shards and
    index never mix with the new files, and a kill mid-export leaves the previous directory. An existing `out`
    that is not an HF checkpoint directory is refused rather than replaced."""
    from safetensors.torch import save_file

    from lmlab.tokenizer import BPETokenizer
    from lmlab.utils import atomic_dir, recover_dir

    out = Path(out)
    recover_dir(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_hf_dir(out))):
        raise LmlabError(f"--out {out} exists and is not an HF checkpoint directory (no config.json); an HF export "
                         "replaces the whole directory, so give a new or HF directory")
    cfg = model.cfg
    config = hf_config(cfg, tokenizer)
    state = to_hf_state(cfg, model.state_dict())
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            hf_tok = tokenizer.tok if isinstance(tokenizer, BPETokenizer) else char_tokenizer_as_hf(tokenizer)
            hf_tok.save(str(tmp / "tokenizer.json"))
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.context_length,
                  "clean_up_tokenization_spaces": False}
            if isinstance(tokenizer, BPETokenizer):
                tc.update({k: v for k, v in (("eos_token", tokenizer.eos_token), ("bos_token", tokenizer.bos_token),
                                             ("chat_template", tokenizer.chat_template)) if v is not None})
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return out


def char_tokenizer_as_hf(tokenizer):
    """A character tokenizer as an HF `tokenizers` Tokenizer: one word-level token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok
