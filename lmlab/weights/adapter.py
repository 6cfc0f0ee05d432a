"""LoRA adapters in and out: our own (a LoRA fine-tune's checkpoint: lmlab.json naming the base, plus
adapter.safetensors) and HF PEFT's (adapter_config.json + adapter_model.safetensors, what
`peft.PeftModel.from_pretrained` reads and `save_pretrained` writes); out also as a llama.cpp LoRA GGUF (what its
convert_lora_to_gguf.py writes and `llama-cli --lora` applies).

PEFT names each adapted layer by its HF module: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
(r, in) and `...lora_B.weight` (out, r). Ours are the slices of lmlab.lora: `blocks.3.attn.qkv.lora_A.q`. The
table below pairs HF's module suffixes with (our module, slice); the tensors are the same matrices, unpermuted,
since our fused q/k/v rows are HF's q_proj, k_proj and v_proj rows in order (weights/hf.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from lmlab.config import LoRAConfig, ModelConfig
from lmlab.errors import LmlabError
from lmlab.utils import current_dir, read_json

OURS = "adapter.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# HF module (after the layer prefix) -> (our module in a block, our slice name).
MODULES = {
    "llama": {"self_attn.q_proj": ("attn.qkv", "q"), "self_attn.k_proj": ("attn.qkv", "k"),
              "self_attn.v_proj": ("attn.qkv", "v"), "self_attn.o_proj": ("attn.proj", "o"),
              "mlp.gate_proj": ("mlp.gate", "gate"), "mlp.up_proj": ("mlp.up", "up"),
              "mlp.down_proj": ("mlp.down", "down")},
    "gpt2": {"attn.c_attn": ("attn.qkv", "qkv"), "attn.c_proj": ("attn.proj", "o"), "mlp.c_fc": ("mlp.up", "up"),
             "mlp.c_proj": ("mlp.down", "down")},
}
LAYER_PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h."}
# our slice -> the llama.cpp base tensor it adapts, in blk.{i}. (weights/gguf.py's tables)
GGUF_NAMES = {"llama": {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
                        "up": "ffn_up", "down": "ffn_down"},
              "gpt2": {"qkv": "attn_qkv", "o": "attn_output", "up": "ffn_up", "down": "ffn_down"}}
OUR_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.lora_([AB])\.(\w+)$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A PEFT adapter directory, or an lmlab checkpoint or run whose lmlab.json says it holds an adapter."""
    return read_adapter_meta(Path(path)) is not None


def read_adapter_meta(path: Path) -> tuple[Path, dict] | None:
    """(the directory holding the files, lmlab.json or adapter_config.json) of an adapter at `path`, or None."""
    from lmlab.checkpoint import read_meta, resolve_checkpoint

    if (path / PEFT_CONFIG).is_file():
        return path, read_json(path / PEFT_CONFIG, "PEFT adapter config")
    ckpt = resolve_checkpoint(path) if path.is_dir() else None
    if ckpt is not None:
        meta = read_meta(ckpt)
        return (ckpt, meta) if "adapter" in meta else None
    return None


def read_adapter(path: str | os.PathLike, cfg: ModelConfig) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """(settings, tensors under our keys) of our adapter or a PEFT one at `path`, for a model of config `cfg`."""
    from safetensors.torch import load_file

    found = read_adapter_meta(Path(path))
    if found is None:
        raise LmlabError(f"{path} is not a LoRA adapter: expected a PEFT directory ({PEFT_CONFIG} + "
                         f"{PEFT_WEIGHTS}) or an lmlab LoRA fine-tune run")
    where, meta = found
    if "adapter" in meta:  # ours
        settings = {k: v for k, v in meta["adapter"].items() if k != "base"}
        return LoRAConfig.from_dict(settings), load_file(str(where / OURS))
    lora = peft_settings(meta, where)
    if not (where / PEFT_WEIGHTS).is_file():
        raise LmlabError(f"{where} has no {PEFT_WEIGHTS} (a .bin adapter must be re-saved with safetensors)")
    state, targets = from_peft(load_file(str(where / PEFT_WEIGHTS)), cfg, str(where))
    return LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=targets, rslora=lora.rslora), state


def peft_settings(c: dict, where: Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter_config.json, refusing the PEFT options our LoRA does not compute."""
    if c.get("peft_type", "LORA") != "LORA":
        raise LmlabError(f"{where}: PEFT type {c.get('peft_type')!r} is not supported; only LORA adapters load")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                   if c.get(k)]
    if c.get("bias", "none") != "none":
        unsupported.append(f"bias={c['bias']}")
    if unsupported:
        raise LmlabError(f"{where}: this PEFT adapter uses {', '.join(unsupported)}, which lmlab's LoRA does not "
                         "compute; supported: plain LoRA (r, lora_alpha, target_modules, use_rslora)")
    try:
        return LoRAConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout") or 0),
                          rslora=bool(c.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise LmlabError(f"{where / PEFT_CONFIG}: missing or malformed field ({e})") from None


def from_peft(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str
              ) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """PEFT tensors under our keys, and the target names they cover."""
    modules, prefix = MODULES[cfg.family], PEFT_PREFIX + LAYER_PREFIX[cfg.family]
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)\.lora_([AB])(?:\.\w+)?\.weight$")
    state, targets = {}, set()
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None or m.group(2) not in modules:
            raise LmlabError(f"{where}: tensor {key!r} names no layer a {cfg.family}-family lmlab model has; the "
                             "adapter was made for another architecture")
        ours, slice_name = modules[m.group(2)]
        state[f"blocks.{m.group(1)}.{ours}.lora_{m.group(3)}.{slice_name}"] = t
        targets.add(slice_name)
    return state, tuple(sorted(targets))


def to_peft(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our adapter tensors under PEFT's names."""
    back = {v: k for k, v in MODULES[cfg.family].items()}
    out = {}
    for key, t in state.items():
        m = OUR_KEY.match(key)
        if m is None or (m.group(2), m.group(4)) not in back:
            raise AssertionError(f"not an adapter key of ours: {key}")
        hf = back[(m.group(2), m.group(4))]
        out[f"{PEFT_PREFIX}{LAYER_PREFIX[cfg.family]}{m.group(1)}.{hf}.lora_{m.group(3)}.weight"] = \
            t.detach().float().cpu().contiguous()
    return out


def apply_adapter(model, path: str | os.PathLike, merge: bool = True) -> None:
    """Put the adapter at `path` on `model`, in place; with `merge`, fold it into float layers (a quantized base
    keeps it as LoRA layers beside its packed weights)."""
    from lmlab.lora import apply_lora, load_adapter_state, lora_layers, merge_lora

    cfg, state = read_adapter(path, model.cfg)
    apply_lora(model, cfg)
    load_adapter_state(model, state, str(path))
    if merge and all(isinstance(layer.base, torch.nn.Linear) for layer in lora_layers(model).values()):
        merge_lora(model)


def our_adapter(path: str | os.PathLike, fmt: str) -> tuple[ModelConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """(base config, lmlab.json's "adapter", tensors) of our adapter at `path`, or the error for exporting
    anything else as `fmt`."""
    from safetensors.torch import load_file

    found = read_adapter_meta(Path(path))
    if found is None or "adapter" not in found[1]:
        raise LmlabError(f"{path} holds no lmlab LoRA adapter; --format {fmt} exports a run made by "
                         "lmlab finetune --lora")
    where, meta = found
    return ModelConfig.from_dict(meta["config"]), meta["adapter"], load_file(str(current_dir(where) / OURS))


def export_peft(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write our adapter at `path` (a LoRA run or checkpoint) as a PEFT adapter directory `out`, atomically."""
    from safetensors.torch import save_file

    from lmlab.utils import atomic_dir

    cfg, ad, state = our_adapter(path, "peft")
    # PEFT matches a target by the end of the module's name: q_proj for Llama; GPT-2's two c_proj need their parent
    targets = sorted(hf.rsplit(".", 1)[-1] if cfg.family == "llama" else hf
                     for hf, (_, name) in MODULES[cfg.family].items() if name in ad["targets"])
    config = peft_config(ad, targets, cfg.family)
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / PEFT_CONFIG).is_file())):
        raise LmlabError(f"--out {out} exists and is not a PEFT adapter directory; give a new directory")
    with atomic_dir(out) as tmp:
        save_file(to_peft(state, cfg), str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def peft_config(ad: dict[str, Any], targets: list[str], family: str) -> dict[str, Any]:
    """adapter_config.json for our adapter settings `ad` (lmlab.json's "adapter")."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": ad.get("base"),
            "r": ad["r"], "lora_alpha": ad["alpha"], "lora_dropout": ad["dropout"], "target_modules": targets,
            "use_rslora": ad.get("rslora", False), "bias": "none", "fan_in_fan_out": family == "gpt2",
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_dora": False}


def export_gguf_lora(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write our adapter at `path` as a llama.cpp LoRA adapter file: each adapted base tensor T gets T.lora_a
    (r, in) and T.lora_b (out, r), float32; the B rows of q and k take llama.cpp's q/k permutation, as the base
    file's q and k rows do; llama.cpp scales by adapter.lora.alpha / r, so an rsLoRA adapter's alpha is rescaled."""
    import numpy as np
    from gguf import GGUFWriter

    from lmlab.utils import atomic_file
    from lmlab.weights.gguf import _permute
    from lmlab.weights.gguf_export import _check_exportable

    cfg, ad, state = our_adapter(path, "gguf-lora")
    arch = _check_exportable(cfg)
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads} if arch == "llama" else {}
    tensors = {}
    for key, t in state.items():
        layer, _, ab, name = OUR_KEY.match(key).groups()
        a = t.detach().float().cpu().numpy()
        if ab == "B" and name in heads:
            a = _permute(a, heads[name])
        tensors[f"blk.{layer}.{GGUF_NAMES[cfg.family][name]}.weight.lora_{ab.lower()}"] = np.ascontiguousarray(a)
    lora = LoRAConfig.from_dict({k: v for k, v in ad.items() if k != "base"})
    with atomic_file(out) as tmp:
        w = GGUFWriter(tmp, arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", lora.scale * lora.r)
        for name in sorted(tensors):
            w.add_tensor(name, tensors[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)
