"""Loading a GGUF file's quantized tensors straight into lmlab.quant's packed layers: no float32 copy of the model.

Each tensor is read from the file on its own (os.pread, not the memory map, so the file's pages do not pile up in
the process's resident set), split into codes and scales (weights/gguf_quant.py) and turned into a QuantLinear or
QuantEmbedding before the next is read. Peak memory is the packed model plus one tensor's temporaries.

What each stored type becomes, for `quantize=None` (as stored):
    Q4_0, Q4_1, Q4_K          int4, groups of 32: the same numbers (scales rounded to bf16 by the kernel)
    Q8_0, Q6_K                int8 with one scale per row (the int8 kernel's form): requantized, a small loss
    other quantized types     dequantized one tensor at a time, then int8 per row
    F32, F16, BF16            float, in the model's dtype
q, k and v of one layer are fused into one matmul; when their types differ (a Q4_K_M file's Q6_K v beside Q4_K
q and k) the fused layer is int8. With `quantize="int8"` or `"int4"` every matmul takes that form (int4 groups of
another size, or int4 from an 8-bit tensor, go through float, one tensor at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.quant import QuantEmbedding, QuantLinear, check_shape, exact_head, head_mode, quantize_int4, quantize_int8
from lmlab.utils import progress, trim_heap


@dataclass
class Part:
    """One stored tensor as codes: kind "int4" (codes, scale, offset), "int8" (codes, scale per `group` columns),
    "float" (codes is the float32 array of a float tensor) or "dequantized" (the same, from another quantized
    type: packed as int8, since the file asked for a quantized matmul)."""

    kind: str
    codes: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    group: int = 0

    def dequantize(self) -> np.ndarray:
        if self.kind in ("float", "dequantized"):
            return self.codes
        scale = np.repeat(self.scale, self.codes.shape[1] // self.scale.shape[1], axis=1)
        w = self.codes.astype(np.float32) * scale
        return w if self.offset is None else w + np.repeat(self.offset, self.codes.shape[1] // self.offset.shape[1],
                                                           axis=1)

    def map(self, fn, cfg: ModelConfig, others: list[Part]) -> Part:
        """This part fused with `others` (same kind) through a key-map transform applied to every component."""
        parts = [self, *others]

        def apply(attr: str) -> np.ndarray | None:
            arrays = [getattr(p, attr) for p in parts]
            return None if arrays[0] is None else np.ascontiguousarray(fn(cfg, *arrays))

        return Part(self.kind, apply("codes"), apply("scale"), apply("offset"), self.group)


def read_part(f, name: str) -> Part | None:
    """The tensor `name` of GGUFFile `f` as a Part; None if absent."""
    from gguf import GGMLQuantizationType

    from lmlab.weights.gguf_quant import SPLIT_TYPES, split_blocks

    t = f.tensors.get(name)
    if t is None:
        return None
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return Part("float", f.array(name))
    if t.tensor_type not in SPLIT_TYPES:  # another quantized type: dequantized, then treated as float
        return Part("dequantized", f.array(name))
    rows, cols = int(np.prod(t.shape[1:])), int(t.shape[0])
    split = split_blocks(f.raw(name), t.tensor_type, rows, cols)
    if split[0] == "int4":
        return Part("int4", split[1], split[2], split[3], 32)
    return Part("int8", split[1], split[2], None, split[3])


def _int8(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes and scales of a part."""
    from lmlab.weights.gguf_quant import requantize_int8

    if part.kind == "int8":
        codes, scale = requantize_int8(part.codes, part.scale, part.group)
        return torch.from_numpy(codes), torch.from_numpy(scale)
    return quantize_int8(torch.from_numpy(part.dequantize()))


def packed_linear(key: str, part: Part, mode: str | None, group_size: int) -> nn.Module | torch.Tensor:
    """The layer for one matmul weight built from its stored (already fused) part: a QuantLinear, or the float
    weight (a tensor) where the part is float and no quantization is asked for."""
    N, K = part.codes.shape
    if mode is None and part.kind == "float":
        return torch.from_numpy(np.array(part.codes))  # a float tensor may be a read-only view of the file
    want = mode or ("int4" if part.kind == "int4" and N % 16 == 0 else "int8")
    if want == "int4":
        check_shape(key, N, K, "int4", group_size)
        if part.kind == "int4" and group_size == part.group:
            return QuantLinear.from_int4(*(torch.from_numpy(a) for a in (part.codes, part.scale, part.offset)))
        return QuantLinear.from_int4(*quantize_int4(torch.from_numpy(part.dequantize()), group_size))
    return QuantLinear.from_int8(*_int8(part))


def packed_embedding(part: Part, mode: str | None) -> nn.Module | torch.Tensor:
    """The token-embedding table from its stored part: int4 codes stay int4, 8-bit ones become int8 rows."""
    if part.kind == "int4" and mode in (None, "int4"):
        return QuantEmbedding(*(torch.from_numpy(a) for a in (part.codes, part.scale, part.offset)))
    if part.kind == "float" and mode is None:
        return torch.from_numpy(np.array(part.codes))
    return QuantEmbedding(*_int8(part), None)


def fuse(cfg: ModelConfig, fn, parts: list[Part]) -> Part:
    """Parts of one parameter through the key map's transform; parts of different kinds meet as float."""
    if len({p.kind for p in parts}) > 1 or (parts[0].kind == "int8" and len({p.group for p in parts}) > 1):
        kind = "float" if all(p.kind == "float" for p in parts) else "dequantized"
        parts = [Part(kind, p.dequantize()) for p in parts]
    return parts[0].map(fn, cfg, parts[1:])


def _place_embedding(model, part: Part, mode: str | None, group_size: int, state: dict, dtype: torch.dtype) -> None:
    """The token table, and a tied head reading the same stored table packed for the matmul."""
    emb = packed_embedding(part, mode)
    _place(model, "wte", emb, state, dtype)
    if model.cfg.tie_embeddings:
        if isinstance(emb, QuantEmbedding) and emb.mode == "int8":  # one int8 table serves both
            head = QuantLinear.from_int8(emb.weight, emb.scale)
        else:
            head = packed_linear("lm_head", part, head_mode(mode), group_size)
        _place(model, "lm_head", head, state, dtype)


def load_packed(model, f, keymap, mode: str | None, group_size: int, dtype: torch.dtype,
                fuse_mlps: bool = False) -> None:
    """Fill a meta-device model from GGUFFile `f`: matmul weights packed (see the module docstring), the rest
    float in `dtype`, one stored tensor at a time. `fuse_mlps`: each block's packed SwiGLU gate and up become one
    matmul (lmlab.fuse) once both are in, before its down projection is read."""
    from lmlab.fuse import fuse_mlp

    cfg = model.cfg
    matmuls = {name + ".weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    state: dict[str, torch.Tensor] = {}
    keys = list(model.state_dict())  # a bar on a terminal: an 8B file takes about a minute, once (then it is cached)
    for key in progress(keys, f"packing {Path(f.path).name}", "tensor"):
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if fuse_mlps and key.endswith(".mlp.down.weight"):
            fuse_mlp(model.get_submodule(key.removesuffix(".mlp.down.weight")), quantized_only=True)
        names, fn = keymap.match(key)
        parts = [read_part(f, n) for n in names]
        for n, p in zip(names, parts, strict=True):
            if p is None:
                raise LmlabError(f"{f.path}: the file lacks tensor {n!r} that a {cfg.n_layers}-layer {cfg.family} "
                                 "model needs; it is incomplete or its metadata is wrong")
        part = fuse(cfg, fn, parts)
        del parts
        owner = key.rsplit(".", 1)[0]
        if key not in matmuls:
            value = torch.from_numpy(np.array(part.dequantize()))  # norms, biases: small, and the map is read-only
            if isinstance(model.get_submodule(owner), QuantLinear):  # its weight came first and is packed
                model.get_submodule(owner).bias = nn.Parameter(value.float(), requires_grad=False)
            else:
                state[key] = value.to(dtype)
            continue
        expected = tuple(model.get_submodule(owner).weight.shape)
        if part.codes.shape != expected:
            raise LmlabError(f"{f.path}: tensor for {key} has shape {part.codes.shape} but the metadata implies "
                             f"{expected}; the metadata and the weights do not match")
        if owner == "wte":
            _place_embedding(model, part, mode, group_size, state, dtype)
        else:
            layer_mode = head_mode(mode) if owner == "lm_head" else mode
            _place(model, owner, packed_linear(owner, part, layer_mode, group_size), state, dtype)
        del part
        trim_heap()
    model.load_state_dict(state, strict=False, assign=True)
    left = [k for k, t in model.state_dict().items() if t.is_meta]
    if left:
        raise AssertionError(f"packed GGUF load left {left[0]!r} unfilled")  # a bug here, not the user's
    if cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear) and isinstance(model.wte, nn.Embedding):
        model.lm_head.weight = model.wte.weight
    exact_head(model)
    model.init_rope()
    model.eval()


def _place(model, owner: str, layer: nn.Module | torch.Tensor, state: dict, dtype: torch.dtype) -> None:
    """Put a packed module in place of `owner`, or queue a float weight for load_state_dict."""
    if isinstance(layer, torch.Tensor):
        state[owner + ".weight"] = layer.to(dtype)
        return
    parent, _, attr = owner.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
