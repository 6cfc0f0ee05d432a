"""A GGUF file of any preset's shape, with random quantized weights and a real tokenizer, as llama.cpp lays it out.

    python benchmarks/synthetic_gguf.py --preset llama-3.1-8b --qtype Q4_0 --out /tmp/l8b.gguf
    python benchmarks/synthetic_gguf.py --preset smollm2-135m --qtype Q4_K_M --layers 2 --out /tmp/s.gguf

For measuring load time, peak RSS and decode speed of models we cannot download (issue 9: Llama-3.1-8B on a
24 GB CPU box). Tensor names, metadata and the per-tensor types follow llama.cpp (convert_hf_to_gguf.py,
src/llama-quant.cpp `llama_tensor_get_type`): layer matrices and token_embd in the requested type, output.weight
in Q6_K, norms F32, Llama 3's rope scaling as the rope_freqs tensor; Q4_K_M uses Q6_K for attn_v and ffn_down
in the layers llama.cpp's `use_more_bits` picks. A K-quant tensor whose rows are not a multiple of 256 values
falls back as llama.cpp's does for Q6_K (to Q8_0); Q4_K falls back to Q4_1 (llama.cpp takes Q5_0, which the
packed loader does not split). The q/k rows are random, so llama.cpp's q/k permutation has nothing to undo.

The weights are random codes with per-block scales giving a root mean square of 0.02 (weights/gguf_quant.py
`random_blocks`), generated and written one tensor at a time: an 8B-shaped file (~4.7 GB) never sits in memory.
The tokenizer is SmolLM2's, copied from the cached SmolLM2-135M-Instruct GGUF (or --tokenizer FILE), its token
list padded with "<|reserved_special_token_i|>" control tokens up to the model's vocabulary size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from lmlab.config import ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.weights.gguf_quant import random_blocks

Q = GGMLQuantizationType
# --qtype -> (type of layer matrices and token_embd, llama_ftype written as general.file_type)
FILE_TYPES = {
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0), "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0), "Q4_K": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M), "Q6_K": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
_K_FALLBACK = {Q.Q6_K: Q.Q8_0, Q.Q4_K: Q.Q4_1}  # rows of a K-quant must hold whole 256-value super-blocks
_LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in Q4_K_M (llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(cfg: ModelConfig, qtype: str) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(GGUF name, torch-order shape (rows, cols) or (n,), type) of every tensor, in llama.cpp's file order."""
    if cfg.family != "llama":
        raise LmlabError(f"synthetic GGUF files are Llama-family; preset family is {cfg.family!r}")
    if qtype not in FILE_TYPES:
        raise LmlabError(f"--qtype {qtype!r} is not supported; supported: {', '.join(FILE_TYPES)}")
    base = FILE_TYPES[qtype][0]
    C, F, D = cfg.d_model, cfg.d_ff, cfg.head_dim
    shapes = {"attn_q": (cfg.n_heads * D, C), "attn_k": (cfg.n_kv_heads * D, C), "attn_v": (cfg.n_kv_heads * D, C),
              "attn_output": (C, cfg.n_heads * D), "ffn_gate": (F, C), "ffn_up": (F, C), "ffn_down": (C, F)}
    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = []
    if cfg.rope_scaling == "llama3":
        plan.append(("rope_freqs.weight", (D // 2,), Q.F32))
    plan.append(("token_embd.weight", (cfg.vocab_size, C), base))
    for i in range(cfg.n_layers):
        plan.append((f"blk.{i}.attn_norm.weight", (C,), Q.F32))
        for name in _LAYER:
            more = qtype == "Q4_K_M" and name in ("attn_v", "ffn_down") and _use_more_bits(i, cfg.n_layers)
            plan.append((f"blk.{i}.{name}.weight", shapes[name], Q.Q6_K if more else base))
        plan.append((f"blk.{i}.ffn_norm.weight", (C,), Q.F32))
    plan.append(("output_norm.weight", (C,), Q.F32))
    if not cfg.tie_embeddings:
        plan.append(("output.weight", (cfg.vocab_size, C), Q.Q6_K))
    out = []
    for name, shape, t in plan:
        if t != Q.F32 and shape[-1] % GGML_QUANT_SIZES[t][0]:
            t = _K_FALLBACK.get(t, t)
            if shape[-1] % GGML_QUANT_SIZES[t][0]:
                raise LmlabError(f"{name} has {shape[-1]} columns, not a multiple of {t.name}'s block of "
                                 f"{GGML_QUANT_SIZES[t][0]}")
        out.append((name, shape, t))
    return out


def tokenizer_fields(source: str | Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer.ggml.* values of GGUF file `source` (as weights/gguf_export.py writes them), its tokens padded
    with reserved control tokens to `vocab_size`, as Llama 3's own vocabulary pads its special range."""
    from lmlab.weights.gguf import GGUFFile

    f = GGUFFile(source)
    if f.meta("tokenizer.ggml.model", None) != "gpt2":
        raise LmlabError(f"{source}: no byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2') in its metadata")
    tokens, types = list(f.meta("tokenizer.ggml.tokens")), list(f.meta("tokenizer.ggml.token_type"))
    if len(tokens) > vocab_size:
        raise LmlabError(f"{source}'s tokenizer has {len(tokens)} tokens, more than the model's vocabulary of "
                         f"{vocab_size}")
    pad = vocab_size - len(tokens)
    return {"tokens": tokens + [f"<|reserved_special_token_{i}|>" for i in range(pad)], "types": types + [3] * pad,
            "merges": f.meta("tokenizer.ggml.merges", []), "pre": f.meta("tokenizer.ggml.pre", "gpt-2"),
            "bos": f.meta("tokenizer.ggml.bos_token_id", None), "eos": f.meta("tokenizer.ggml.eos_token_id", None),
            "add_bos": bool(f.meta("tokenizer.ggml.add_bos_token", False)),
            "template": f.meta("tokenizer.chat_template", None)}


def _write_config(w: GGUFWriter, cfg: ModelConfig, qtype: str, name: str) -> None:
    """The llama.* and general.* metadata llama.cpp's converter and quantizer write for a quantized Llama: the
    exporter's, with the quantized file type, the vocabulary size and the quantization version."""
    from lmlab.weights.gguf_export import write_config

    write_config(w, cfg, "llama", int(FILE_TYPES[qtype][1]), name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_quantization_version(2)  # GGML_QNT_VERSION


def _tensor_data(cfg: ModelConfig, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType,
                 rng: np.random.Generator) -> np.ndarray:
    if name == "rope_freqs.weight":
        from lmlab.weights.gguf_export import gguf_tensors

        return gguf_tensors(cfg, {})["rope_freqs.weight"]  # the exporter's divisors for Llama 3 rope scaling
    if qtype == Q.F32:  # norms: ones, as a freshly initialised RMSNorm (real ones are about that size)
        return np.ones(shape, np.float32)
    return random_blocks(qtype, *shape, rng=rng)


def write_synthetic_gguf(cfg: ModelConfig, qtype: str, out: str | Path, tokenizer: str | Path | None = None,
                         name: str = "synthetic", seed: int = 0) -> Path:
    """Write a random-weight GGUF of shape `cfg` (a Llama) with `qtype` ("Q4_0", "Q4_K_M", ... see FILE_TYPES)
    to `out`, and the tokenizer of GGUF file `tokenizer` (None: no tokenizer). Tensor infos go first, then each
    tensor is generated and written in turn, so memory holds one tensor at a time. Atomic, as the exporter."""
    from lmlab.utils import atomic_file
    from lmlab.weights.gguf_export import write_tokenizer

    plan = tensor_plan(cfg, qtype)
    tok = tokenizer_fields(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    with atomic_file(out) as tmp:
        w = GGUFWriter(tmp, "llama")
        _write_config(w, cfg, qtype, name)
        if tok is not None:
            write_tokenizer(w, tok)
        for tname, shape, t in plan:
            if t == Q.F32:
                w.add_tensor_info(tname, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            else:
                block, size = GGML_QUANT_SIZES[t]
                rows, cols = shape
                w.add_tensor_info(tname, (rows, cols // block * size), np.dtype(np.uint8),
                                  rows * cols // block * size, raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (tname, shape, t) in enumerate(plan):
            w.write_tensor_data(_tensor_data(cfg, tname, shape, t, np.random.default_rng([seed, i])))
        w.close()
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.1-8b", help="a Llama-family preset of lmlab.config.PRESETS")
    ap.add_argument("--qtype", default="Q4_0", help=f"one of {', '.join(FILE_TYPES)}")
    ap.add_argument("--out", required=True, help="the GGUF file to write")
    ap.add_argument("--tokenizer", help="a GGUF file whose tokenizer to copy (default: the cached "
                                        "smollm2-135m-instruct); 'none' for no tokenizer")
    for flag, field in (("--layers", "n_layers"), ("--d-model", "d_model"), ("--d-ff", "d_ff"),
                        ("--heads", "n_heads"), ("--kv-heads", "n_kv_heads"), ("--vocab", "vocab_size")):
        ap.add_argument(flag, type=int, dest=field, help=f"override the preset's {field}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        changes = {k: v for k in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "vocab_size")
                   if (v := getattr(args, k)) is not None}
        cfg = preset(args.preset).replace(**changes)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from lmlab.data.fetch import fetch_model

            tokenizer = fetch_model("smollm2-135m-instruct")
        t = time.perf_counter()
        path = write_synthetic_gguf(cfg, args.qtype, args.out, None if tokenizer == "none" else tokenizer,
                                    name=f"synthetic {args.preset} {args.qtype}", seed=args.seed)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out the OS refuses (no permission, a directory, disk full)
        print(f"lmlab: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {path.stat().st_size / 1e9:.3f} GB, {cfg.n_layers} layers, {args.qtype}, "
          f"in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
