"""GGUF files (llama.cpp's format): Llama-family weights, quantized or not, and the tokenizer in their metadata.

The file is read with the `gguf` package's `GGUFReader` (llama.cpp's own Python reader) and every tensor is
expanded to the compute dtype with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants and
whatever else that package can dequantize). Tensor names map onto ours through the table below, as in
weights/hf.py. Two things differ from an HF checkpoint:

- llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows of each head of q and
  k so that ggml's rope rotates adjacent pairs (2i, 2i+1); our model, like HF, rotates (i, i + D/2), so the
  loader puts the rows back (`_unpermute`, the inverse of llama.cpp's permute).
- Llama 3.1's rope scaling is not in the metadata but in a tensor of per-frequency divisors,
  `rope_freqs.weight`; the loader recovers the four numbers of `rope_scaling="llama3"` that generate it and
  checks that they regenerate it.

The tokenizer in the metadata is rebuilt by weights/gguf_tokenizer.py; the exporter is weights/gguf_export.py.
References: the GGUF spec (ggml docs/gguf.md); llama.cpp convert_hf_to_gguf.py and gguf-py/gguf/constants.py.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.checkpoint import load_converted
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.quant import GROUP_SIZE
from lmlab.weights.gguf_tokenizer import gguf_tokenizer
from lmlab.weights.keymap import KeyMap, Row

SUPPORTED_ARCHITECTURES = ("llama", "gpt2")
SUPPORTED_TOKENIZERS = ("gpt2",)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows (0, D/2, 1, D/2+1, ...) back to (0, 1, ...).

    llama.cpp's `permute`: w.reshape(H, 2, D/2, C).swapaxes(1, 2) makes rotate-half pairs adjacent; this is its
    inverse. (H*D, C) -> (H*D, C)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _same(cfg: ModelConfig, t: np.ndarray) -> np.ndarray:
    return t


def _qkv(cfg: ModelConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Our fused rows [q; k; v]: (H*D + 2*K*D, C), q and k back in the rotate-half layout."""
    return np.concatenate((_unpermute(q, cfg.n_heads), _unpermute(k, cfg.n_kv_heads), v), axis=0)


# (our key, GGUF tensors it is built from, transform(cfg, *tensors)). "{i}" is the layer index.
# output.weight absent means the head is tied to the embeddings.
_B = "blk.{i}."
GGUF_LLAMA_KEYS: list[Row] = [
    ("wte.weight", ("token_embd.weight",), _same),
    ("blocks.{i}.norm1.weight", (_B + "attn_norm.weight",), _same),
    ("blocks.{i}.attn.qkv.weight", (_B + "attn_q.weight", _B + "attn_k.weight", _B + "attn_v.weight"), _qkv),
    ("blocks.{i}.attn.proj.weight", (_B + "attn_output.weight",), _same),
    ("blocks.{i}.norm2.weight", (_B + "ffn_norm.weight",), _same),
    ("blocks.{i}.mlp.gate.weight", (_B + "ffn_gate.weight",), _same),
    ("blocks.{i}.mlp.up.weight", (_B + "ffn_up.weight",), _same),
    ("blocks.{i}.mlp.down.weight", (_B + "ffn_down.weight",), _same),
    ("norm_f.weight", ("output_norm.weight",), _same),
    ("lm_head.weight", ("output.weight",), _same),
]
# llama.cpp's gpt2 architecture keeps q, k and v fused as we do, and stores every matrix as (out, in).
GGUF_GPT2_KEYS: list[Row] = [
    ("wte.weight", ("token_embd.weight",), _same),
    ("wpe.weight", ("position_embd.weight",), _same),
    *[(f"blocks.{{i}}.{ours}.{p}", (f"{_B}{theirs}.{p}",), _same) for ours, theirs in (
        ("norm1", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"), ("norm2", "ffn_norm"),
        ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")) for p in ("weight", "bias")],
    ("norm_f.weight", ("output_norm.weight",), _same),
    ("norm_f.bias", ("output_norm.bias",), _same),
    ("lm_head.weight", ("output.weight",), _same),
]
# Tensors read for the config rather than mapped onto a parameter.
_CONFIG_TENSORS = ("rope_freqs.weight",)


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`), the inverse of _unpermute."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _split_qkv(cfg: ModelConfig, t: np.ndarray) -> list[np.ndarray]:
    D = cfg.head_dim
    q, k, v = np.split(t, [cfg.n_heads * D, (cfg.n_heads + cfg.n_kv_heads) * D], axis=0)
    return [_permute(q, cfg.n_heads), _permute(k, cfg.n_kv_heads), v]


@functools.cache
def keymaps() -> dict[str, KeyMap]:
    inverses = {_same: lambda cfg, t: [t], _qkv: _split_qkv}
    return {"llama": KeyMap(GGUF_LLAMA_KEYS, inverses), "gpt2": KeyMap(GGUF_GPT2_KEYS, inverses)}


class GGUFFile:
    """Metadata and lazily dequantized tensors of one GGUF file, every failure an LmlabError."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LmlabError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise LmlabError(f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
                             + ("; it is empty" if not magic else ""))
        reader_class = _reader_class()  # a missing `gguf` package is its own error, not a damaged file
        try:
            reader = reader_class(self.path)
        except Exception as e:  # the reader fails in many ways on a damaged file: IndexError, ValueError, ...
            raise LmlabError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated "
                             "or corrupt, download it again") from None
        self.fields = reader.fields
        self.tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.data.nbytes != t.n_bytes:
                raise LmlabError(f"{self.path} is truncated: tensor {t.name} needs {t.n_bytes} bytes but the file "
                                 f"holds {t.data.nbytes}; download it again")

    def meta(self, key: str, default: Any = ...) -> Any:
        """A metadata value as a Python str, number, bool or list; `default` when absent (else an error)."""
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise LmlabError(f"{self.path}: metadata key {key!r} is missing; the file is incomplete")
            return default
        try:
            return field.contents()
        except Exception as e:
            raise LmlabError(f"{self.path}: cannot read metadata key {key!r} ({e}); the file is corrupt") from None

    def array(self, name: str) -> np.ndarray | None:
        """The tensor `name` dequantized to float32, in torch's (rows, columns) order; None if absent."""
        from gguf import quants

        t = self.tensors.get(name)
        if t is None:
            return None
        try:
            arr = quants.dequantize(t.data, t.tensor_type)  # float32, shape reversed from ggml's (columns first)
        except NotImplementedError:
            raise LmlabError(f"{self.path}: tensor {name} is stored as {t.tensor_type.name}, which cannot be "
                             f"dequantized; supported types: {', '.join(supported_types())}") from None
        except ValueError as e:
            raise LmlabError(f"{self.path}: tensor {name} ({t.tensor_type.name}) is malformed ({e})") from None
        return arr

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor `name` as stored, read with pread rather than through the memory map, so that
        reading a whole model does not leave it resident (the mapped pages would count toward RSS)."""
        t = self.tensors[name]
        with open(self.path, "rb") as fh:
            data = os.pread(fh.fileno(), int(t.n_bytes), int(t.data_offset))
        if len(data) != t.n_bytes:
            raise LmlabError(f"{self.path} is truncated: tensor {name} needs {t.n_bytes} bytes; download it again")
        return np.frombuffer(data, dtype=np.uint8)

    def is_quantized(self, name: str) -> bool:
        from gguf import GGMLQuantizationType as Q

        t = self.tensors.get(name)
        return t is not None and t.tensor_type not in (Q.F32, Q.F16, Q.BF16)


@functools.cache
def _reader_class():
    """GGUFReader over a plain ndarray view of its memory map.

    The reader slices its `np.memmap` once per string of the vocabulary and merges (several per entry), and
    each slice of a memmap subclass runs Python-level bookkeeping (`__array_finalize__`); slicing a plain view
    of the same mapping is ~4x faster, and dequantizing from it too. Only the public `data` attribute is
    intercepted, so the reader's own parsing is unchanged."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise LmlabError("reading GGUF files needs the `gguf` package: pip install gguf") from None

    class PlainViewReader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)  # shares the mapping, which stays open while views exist

    return PlainViewReader


def supported_types() -> list[str]:
    """The GGUF tensor types this installation of `gguf` can dequantize."""
    from gguf import GGMLQuantizationType, quants

    traits = getattr(quants, "_type_traits", {})
    return ["F32", "F16", *(q.name for q in GGMLQuantizationType if q in traits)]


# ---------------------------------------------------------------------------------------------------------
# metadata -> ModelConfig


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """Translate llama.cpp's `llama.*` metadata into our ModelConfig, refusing what our model would get wrong."""
    arch = f.meta("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LmlabError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def num(key: str, default: Any = ...) -> Any:
        value = f.meta(f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LmlabError(f"{f.path}: metadata {arch}.{key} must be a number, got {value!r}")
        return value

    if arch == "gpt2":
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise LmlabError(f"{f.path}: the file has no token_embd.weight tensor; it is incomplete")
        try:
            return ModelConfig(
                family="gpt2", vocab_size=int(embd.shape[-1]), context_length=int(num("context_length")),
                d_model=int(num("embedding_length")), d_ff=int(num("feed_forward_length")),
                n_layers=int(num("block_count")), n_heads=int(num("attention.head_count")),
                norm_eps=float(num("attention.layer_norm_epsilon", 1e-5)),
                tie_embeddings="output.weight" not in f.tensors)
        except LmlabError as e:
            raise LmlabError(f"{f.path}: metadata gives an invalid model: {e}") from None
    if num("expert_count", 0) > 0:
        raise LmlabError(f"{f.path}: mixture-of-experts models ({arch}.expert_count > 0) are not supported")
    d_model, n_heads = int(num("embedding_length")), int(num("attention.head_count"))
    n_kv_heads = int(num("attention.head_count_kv", n_heads))
    if n_heads < 1 or d_model % n_heads:
        raise LmlabError(f"{f.path}: embedding_length {d_model} is not a multiple of head_count {n_heads}")
    head_dim = d_model // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if int(num(key, head_dim)) != head_dim:
            raise LmlabError(f"{f.path}: {arch}.{key} = {num(key)} differs from embedding_length / head_count = "
                             f"{head_dim}; partial rotary or a separate head size is not supported")
    scaling = f.meta(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise LmlabError(f"{f.path}: rope scaling type {scaling!r} is not supported; supported: none, and Llama 3's "
                         "rope_freqs tensor")
    embd = f.tensors.get("token_embd.weight")  # ggml lists dimensions columns first: shape (C, vocab)
    if embd is None:
        raise LmlabError(f"{f.path}: the file has no token_embd.weight tensor; it is incomplete")
    theta = float(num("rope.freq_base", 10000.0))
    rope: dict[str, Any] = {}
    if "rope_freqs.weight" in f.tensors:
        factors = torch.from_numpy(f.array("rope_freqs.weight").astype(np.float64))
        rope = _llama3_rope(factors, theta, head_dim, str(f.path))
    try:
        return ModelConfig(
            family="llama", vocab_size=int(embd.shape[-1]), context_length=int(num("context_length")),
            d_model=d_model, d_ff=int(num("feed_forward_length")), n_layers=int(num("block_count")),
            n_heads=n_heads, n_kv_heads=n_kv_heads, norm_eps=float(num("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta, tie_embeddings="output.weight" not in f.tensors, **rope)
    except LmlabError as e:
        raise LmlabError(f"{f.path}: metadata gives an invalid model: {e}") from None


def gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata (+ the small rope_freqs tensor): no weight is read."""
    return config_from_gguf(GGUFFile(path))


def _llama3_rope(factors: torch.Tensor, theta: float, head_dim: int, source: str) -> dict[str, Any]:
    """The `rope_scaling="llama3"` settings that generate llama.cpp's per-frequency divisors `factors` (D/2,).

    convert_hf_to_gguf.py writes 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s)
    between, with s = original_context / wavelength - low) / (high - low): linear in 1 / wavelength, so the band
    gives s = a / wavelength - b, and only a and b matter. With low = 1 (every Llama 3 release):
    high = 1 + 1 / b and original_context = a / b. The result is checked by regenerating the divisors."""
    from lmlab.model import rope_inv_freq

    if factors.shape != (head_dim // 2,):
        raise LmlabError(f"{source}: rope_freqs.weight has shape {tuple(factors.shape)}, expected ({head_dim // 2},)")
    factor = float(factors.max())
    if abs(factor - 1.0) < 1e-6 and float(factors.min()) > 1 - 1e-6:
        return {}  # all ones: no scaling
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)
    band = (s > 1e-4) & (s < 1 - 1e-4)
    settings: dict[str, Any] | None = None
    if int(band.sum()) >= 2:
        x = torch.stack((1 / wavelen[band], -torch.ones(int(band.sum()), dtype=torch.float64)), dim=1)
        a, b = torch.linalg.lstsq(x, s[band].unsqueeze(1)).solution.flatten().tolist()
        if a > 0 and b > 0:
            settings = dict(rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=1.0,
                            rope_high_freq_factor=1.0 + 1.0 / b, rope_original_context=max(1, round(a / b)))
    if settings is not None:
        cfg = ModelConfig(family="llama", d_model=head_dim, n_heads=1, rope_theta=theta, **settings)
        expected = (inv_freq / factors).float()
        if torch.allclose(rope_inv_freq(cfg), expected, rtol=1e-4, atol=0):
            return settings
    raise LmlabError(f"{source}: rope_freqs.weight does not follow Llama 3's rope scaling (factors "
                     f"{factors.min():.3g}..{factor:.3g}); this rope scaling is not supported")


# ---------------------------------------------------------------------------------------------------------
# loading


def map_gguf_weights(cfg: ModelConfig, our_keys: list[str], get: Callable[[str], np.ndarray | None],
                     source: str) -> Iterator[tuple[str, np.ndarray]]:
    """(our key, float32 array) for each parameter, built from GGUF tensors fetched with `get(name)`.

    The rearranging is done in numpy, as llama.cpp's converter writes it. One parameter at a time, so a
    caller converting each to a smaller dtype never holds the whole model in float32."""
    def missing(name: str) -> LmlabError:
        return LmlabError(f"{source}: the file lacks tensor {name!r} that a {cfg.n_layers}-layer {cfg.family} model "
                          "needs; it is incomplete or its metadata is wrong")

    return keymaps()[cfg.family].load(cfg, our_keys, get, missing)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a dequantized array; F32 tensors are read-only views of the file map and are copied."""
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a)
    return torch.from_numpy(a)


def load_gguf(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              quantize: str | None = None, group_size: int = GROUP_SIZE, fuse: bool = True):
    """A GGUF file -> (Transformer in eval mode, BPETokenizer or None when the file carries no tokenizer).

    `quantize` as lmlab.load takes it: None keeps quantized tensors packed (weights/gguf_packed.py), "int8" or
    "int4" packs every matmul so, "off" dequantizes everything to `dtype`. A packed model's SwiGLU gate and up
    become one packed matmul (lmlab.fuse; `fuse=False` keeps them apart, for LoRA layers to wrap). A packed load
    is kept in lmlab's cache (weights/packed_cache.py), fused as it is used, and later ones of the same file and
    settings map it back in seconds."""
    from lmlab.model import Transformer
    from lmlab.quant import check_device
    from lmlab.weights import packed_cache
    from lmlab.weights.gguf_packed import load_packed

    device = torch.device(device)
    key = None
    if quantize != "off" and device.type == "cpu" and packed_cache.cache_enabled() and Path(path).is_file():
        key = packed_cache.cache_key(Path(path), quantize, group_size, dtype, fuse)
        hit = packed_cache.load_cached(key)
        if hit is not None:
            return hit
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    unused = sorted(set(f.tensors) - set(_CONFIG_TENSORS) - keymaps()[cfg.family].names(cfg.n_layers))
    if unused:
        raise LmlabError(f"{f.path}: tensor {unused[0]!r} ({len(unused)} such in all) has no place in our "
                         f"{cfg.family} model (biases, experts or another variant); this file is not supported")
    as_float = quantize is None and (device.type != "cpu" or not any(f.is_quantized(n) for n in f.tensors))
    if quantize == "off" or as_float or device.type == "cuda":  # the packed kernels are CPU ones (lmlab.quant)
        pairs = ((k, _tensor(a)) for k, a in map_gguf_weights(cfg, list(expected), f.array, str(f.path)))
        load_converted(model, pairs, device, dtype, str(f.path), "the metadata")
        if quantize in ("int8", "int4"):  # on CUDA: torchao's layers over the float weights
            from lmlab.quant import quantize_model

            quantize_model(model, quantize, group_size)
        return model, gguf_tokenizer(f)
    check_device(device)
    load_packed(model, f, keymaps()[cfg.family], quantize, group_size, dtype, fuse)
    tok = gguf_tokenizer(f)
    if key is not None:
        packed_cache.save_cached(key, model, tok)
    return model, tok
