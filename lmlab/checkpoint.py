"""Our checkpoint format: a directory of plain, portable files, written atomically.

    model.safetensors   weights under our module names (tied head stored once)
    lmlab.json          {"format": "lmlab", "version": 1, "config": {...}, "tokenizer": {...}, ...extra}
    tokenizer.json      the tokenizer file (char or HF tokenizers JSON)

A save builds the new directory beside the old one, makes every file durable (fsync), and swaps it in with two
renames (lmlab.utils.atomic_dir); files get the umask's modes (0644 / 0755 under umask 022). A kill or a full
disk at any instant leaves one complete checkpoint: the new one, the old one, or, between the two renames, the
old one set aside as `.NAME.old`, which every reader here finds (current_dir) and the next save puts back.
A run directory holds `best/` and `last/`.

Also here, since every loader ends with it: `finish_load` and `load_converted`, how a model built on the meta
device receives its weights (ours, and the HF and GGUF readers' in lmlab/weights/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer, load_tokenizer, tokenizer_meta
from lmlab.utils import atomic_dir, current_dir, progress, read_json, trim_heap

META = "lmlab.json"
FORMAT_VERSION = 1


def is_checkpoint(path: Path) -> bool:
    return (current_dir(path) / META).is_file()


def resolve_checkpoint(path: Path) -> Path | None:
    """A checkpoint dir itself, or a run dir's best/ (falling back to last/), or None. The path returned is where
    the files are now (a checkpoint whose swap a kill interrupted is read from its set-aside copy)."""
    for candidate in (path, path / "best", path / "last"):
        if is_checkpoint(candidate):
            return current_dir(candidate)
    return None


def save_model(path: str | os.PathLike, model: Transformer, tokenizer: Tokenizer | None,
               extra: dict[str, Any] | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Write a model (+ tokenizer, + extra JSON fields, + extra files) as a checkpoint directory, atomically."""
    return save_checkpoint(path, model.cfg, model.state_dict(), tokenizer, extra, files)


def save_checkpoint(path: str | os.PathLike, cfg: ModelConfig, state: dict[str, torch.Tensor],
                    tokenizer: Tokenizer | None, extra: dict[str, Any] | None = None,
                    files: dict[str, bytes] | None = None, weights_file: str = "model.safetensors") -> Path:
    """Write weights `state` of a model with config `cfg` as a checkpoint directory, atomically (a LoRA run's
    checkpoints hold only the adapter, as `adapter.safetensors`: lmlab.training.finetune)."""
    from safetensors.torch import save_file

    path = Path(path)
    remove_stale_temps(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight
    meta = {"format": "lmlab", "version": FORMAT_VERSION, "config": cfg.to_dict(),
            "tokenizer": tokenizer_meta(tokenizer) if tokenizer is not None else None, **(extra or {})}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / weights_file), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def remove_stale_temps(path: Path) -> None:
    """Delete the half-built `.NAME.xxxxxxxx.tmp` directories that kills during earlier saves of `path` left.
    Only the one writer of a checkpoint path (a training run) saves there, so none of them is in use."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG state for an exact resume: the CPU generator and its own device's generator only
    (a process on cuda:1 saves cuda:1's state; saving every visible GPU made resuming on a smaller box fail)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "device": device.type}
    if device.type == "cuda":
        state["device_rng"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["device_rng"] = torch.mps.get_rng_state()
    return state


def device_rng_state(state: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """The saved state of `device`'s generator, or None when the checkpoint holds none for it (another device
    type). Reads the format before this one too: {"torch", "cuda": [every visible GPU's state, by index]}, where
    a process's own GPU is the entry at its device index."""
    if "device" in state:
        return state.get("device_rng") if state["device"] == device.type else None
    old = state.get("cuda")
    if device.type != "cuda" or not old:
        return None
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available()
                                                            else 0)
    return old[index] if index < len(old) else None


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what rng_state saved (or the older format) for a process running on `device`."""
    torch.set_rng_state(state["torch"].cpu())
    own = device_rng_state(state, device)
    if own is not None and device.type == "cuda":
        torch.cuda.set_rng_state(own.cpu(), device)
    elif own is not None and device.type == "mps":
        torch.mps.set_rng_state(own.cpu())


def read_meta(path: Path) -> dict[str, Any]:
    path = current_dir(path)
    meta = read_json(path / META, "checkpoint description", expect=None)
    if not isinstance(meta, dict) or meta.get("format") != "lmlab" or "config" not in meta:
        raise LmlabError(f"{path / META} is not an lmlab checkpoint description")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise LmlabError(f"{path} was written by a newer lmlab (format {meta['version']}); upgrade lmlab")
    return meta


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer | None, dict]:
    """A checkpoint directory -> (model in eval mode, tokenizer or None, its lmlab.json)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = current_dir(path)
    meta = read_meta(path)
    if "adapter" in meta:
        raise LmlabError(f"{path} holds a LoRA adapter, not a whole model; lmlab.load({str(path)!r}) loads its base "
                         f"({meta['adapter'].get('base')}) with the adapter applied")
    cfg = ModelConfig.from_dict(meta["config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        state = load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise LmlabError(f"{path / 'model.safetensors'} is missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise LmlabError(f"{path / 'model.safetensors'} is unreadable ({e}); it may be truncated") from None
    try:
        finish_load(model, state)
    except RuntimeError as e:
        raise LmlabError(f"{path}: weights do not match lmlab.json's config ({str(e).splitlines()[0]})") from None
    model.to(device=device, dtype=dtype).eval()
    tokenizer = None
    if meta.get("tokenizer") is not None:
        tokenizer = load_tokenizer(path / "tokenizer.json", meta["tokenizer"])
    return model, tokenizer, meta


def saved_settings(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lmlab.json of a run's last/ checkpoint (its `config` and `train_config`), or None where there is none:
    what `lmlab.config.train_configs(saved=...)` builds on when a run is resumed with its own settings."""
    last = Path(run_dir) / "last"
    return read_meta(last) if is_checkpoint(last) else None


# ---------------------------------------------------------------------------------------------------------
# The last step every loader shares (our checkpoints, HF directories, GGUF files): a model built on the meta
# device receives its complete state dict, and what is derived from the weights is rebuilt. Loaders convert each
# tensor to its final dtype and device before reading the next (gpt-fast's habit: build on meta, load with
# assign=True), so the state handed here is already the model: assigning it copies nothing.

def finish_load(model, state: dict[str, torch.Tensor]) -> None:
    """Assign a complete state dict to a model built on the meta device, re-tie a tied head, rebuild rope."""
    if model.cfg.tie_embeddings:
        state = dict(state, **{"lm_head.weight": state["wte.weight"]})
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.init_rope()


def load_converted(model, pairs: Iterable[tuple[str, torch.Tensor]], device: torch.device, dtype: torch.dtype,
                   source: str, origin: str) -> None:
    """Fill a meta-device model from (our key, tensor) pairs, converting each to `dtype` on `device` before the
    next is read: peak memory is the finished model plus one source tensor, never two copies of the model.
    `origin` names what set the expected shapes (config.json, the GGUF metadata) for the mismatch error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for key, t in progress(pairs, f"reading {Path(source).name}", "tensor", total=len(expected)):
        if tuple(t.shape) != expected[key]:
            raise LmlabError(f"{source}: tensor for {key} has shape {tuple(t.shape)} but {origin} implies "
                             f"{expected[key]}; {origin} and the weights do not match")
        state[key] = t.to(device=device, dtype=dtype)
        del t  # the source tensor goes before the next is read
        trim_heap()  # and the temporaries freed in the heap with it (q, k, v before fusing)
    finish_load(model, state)
    model.eval()
