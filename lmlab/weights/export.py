"""Export a loaded model to a foreign format by name: the one place that knows which formats exist, so the CLI
and Python users (`export(lm.model, lm.tokenizer, "out.gguf", "gguf")`) check and dispatch the same way."""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.errors import LmlabError, unknown

FORMATS = ("hf", "gguf", "peft", "gguf-lora")
ADAPTER_FORMATS = ("peft", "gguf-lora")  # a LoRA run's adapter alone (weights/adapter.py), for PEFT or llama.cpp


def export(model, tokenizer, out: str | os.PathLike, format: str, dtype: str | None = None) -> Path:
    """Write `model` (+ `tokenizer`, may be None) as an HF directory ("hf") or one GGUF file ("gguf", F32 by
    default or dtype="float16"). Returns the path written."""
    out = check_target(out, format, dtype)
    if format in ADAPTER_FORMATS:
        raise LmlabError(f"{format} exports a LoRA adapter, not a model: see lmlab.weights.adapter")
    if format == "hf":
        from lmlab.weights.hf import export_hf

        return export_hf(model, tokenizer, out)
    from lmlab.weights.gguf_export import export_gguf

    return export_gguf(model, tokenizer, out, dtype=dtype or "float32")


def check_target(out: str | os.PathLike, format: str, dtype: str | None = None) -> Path:
    """Refuse a format, output path or dtype that cannot work, before any model is loaded."""
    out = Path(out)
    if format not in FORMATS:
        raise unknown("export format", format, FORMATS)
    if format == "hf" and dtype not in (None, "float32"):
        raise LmlabError(f"--dtype {dtype}: an HF export is written in float32; --dtype applies to gguf only")
    if format in ("gguf", "gguf-lora") and out.suffix != ".gguf":
        raise LmlabError(f"--out {out}: a GGUF export is one file; give a name ending in .gguf")
    if format in ADAPTER_FORMATS and dtype is not None:
        raise LmlabError(f"--dtype {dtype}: a LoRA adapter is written in float32; --dtype applies to gguf only")
    if format == "gguf" and dtype not in (None, "float32", "float16"):
        raise LmlabError(f"--dtype {dtype}: GGUF export writes float32 or float16")
    return out

