"""LoRA: low-rank adapters applied to a model from outside, as quantization and parallelism are, then merged into
the weights or exported (weights/adapter.py writes them under PEFT's names).

Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; the forward and the init follow
HF PEFT's `peft.tuners.lora.layer.Linear`: y = base(x) + B(A(dropout(x))) * scale, A kaiming-uniform (torch's
nn.Linear init), B = 0, so an adapter starts as the identity and the model's logits are exactly the base's.

Our attention computes q, k and v in one fused matmul (model.Attention.qkv) where HF Llama has q_proj, k_proj and
v_proj. A `LoRALinear` therefore holds one (A, B) pair per *slice* of its output rows: q on rows [0, H*D), v on the
last K*D rows, each pair exactly the shape PEFT gives q_proj or v_proj, so export is a renaming. A layer that is
not fused has one slice over all its rows. The base layer (nn.Linear, or a packed quant.QuantLinear: QLoRA-style)
is frozen and never written; only the A and B parameters train.

Shapes: N output rows of the base, K its inputs, r the rank, n a slice's rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmlab.config import LORA_DEFAULT_TARGETS, LORA_TARGETS, LoRAConfig
from lmlab.errors import LmlabError, closest
from lmlab.quant import QuantLinear

ALL_LINEAR = "all-linear"
# HF's (and PEFT's) names for our targets, accepted on input so a PEFT user's --lora-targets q_proj,v_proj works.
HF_NAMES = {"llama": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                      "up_proj": "up", "down_proj": "down"},
            "gpt2": {"c_attn": "qkv", "attn.c_proj": "o", "c_fc": "up", "mlp.c_proj": "down"}}


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update on named slices of its output rows."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], cfg: LoRAConfig) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1]))  # by first row, for the concatenation
        self.r, self.scale = cfg.r, cfg.scale
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        device = next(iter(base.buffers() if isinstance(base, QuantLinear) else base.parameters())).device
        K = base.in_features
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(cfg.r, K, device=device)) for n in self.slices})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(e - s, cfg.r, device=device))
                                        for n, (s, e) in self.slices.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init_lora_weights=True: nn.Linear's own

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., N)
        h = self.drop(x).to(self.lora_A[next(iter(self.slices))].dtype)
        parts, row = [], 0
        for name, (start, end) in self.slices.items():
            if start > row:
                parts.append(y[..., row:start])
            delta = (h @ self.lora_A[name].t()) @ self.lora_B[name].t()  # (..., r) then (..., n)
            parts.append(y[..., start:end] + (delta * self.scale).to(y.dtype))
            row = end
        if row < self.out_features:
            parts.append(y[..., row:])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """The (N, K) float32 update scale * B A, zero on rows no slice covers."""
        w = torch.zeros(self.out_features, self.in_features, device=self.lora_A[next(iter(self.slices))].device)
        for name, (start, end) in self.slices.items():
            w[start:end] = (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scale
        return w

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing base + update (a quantized base is dequantized to float first)."""
        base = self.base
        weight = base.dequantize() if isinstance(base, QuantLinear) else base.weight.detach().float()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device)
        dtype = torch.float32 if isinstance(base, QuantLinear) else base.weight.dtype
        with torch.no_grad():
            out.weight.copy_(weight + self.delta_weight())
            if base.bias is not None:
                out.bias.copy_(base.bias.float())
        return out.to(dtype).requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, slices={self.slices}"


def resolve_targets(family: str, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Our target names for `targets` (ours, HF's, or all-linear; empty: the family's default), in a fixed order;
    an unknown name is refused with the family's valid ones."""
    valid, hf = LORA_TARGETS[family], HF_NAMES[family]
    if not targets:
        return LORA_DEFAULT_TARGETS[family]
    if ALL_LINEAR in targets:
        return valid
    chosen = set()
    for t in targets:
        name = hf.get(t, t)
        if name not in valid:
            names = (*valid, *hf, ALL_LINEAR)
            raise LmlabError(f"no LoRA target module {t!r} in a {family}-family model{closest(t, names)}; valid "
                             f"names: {', '.join(valid)} (or HF's {', '.join(hf)}), or {ALL_LINEAR}")
        chosen.add(name)
    return tuple(t for t in valid if t in chosen)


def target_slices(model, target: str) -> tuple[str, tuple[int, int]]:
    """(the module path within a block, the rows of its output) that a target name adapts."""
    cfg = model.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    qkv = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "qkv": (0, q + 2 * kv)}
    if target in qkv:
        return "attn.qkv", qkv[target]
    path = {"o": "attn.proj", "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}[target]
    return path, (0, model.blocks[0].get_submodule(path).out_features)


def apply_lora(model, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap each target layer of every block in a LoRALinear, in place.
    Returns the resolved target names. The rank must fit every slice it adapts: r <= min(rows, inputs)."""
    targets = resolve_targets(model.cfg.family, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, dict[str, tuple[int, int]]] = {}
    for t in targets:
        path, rows = target_slices(model, t)
        by_module.setdefault(path, {})[t] = rows
    for path, slices in by_module.items():
        layer = model.blocks[0].get_submodule(path)
        smallest = min(min(e - s for s, e in slices.values()), layer.in_features)
        if cfg.r > smallest:
            raise LmlabError(f"LoRA rank {cfg.r} is larger than the layer it adapts ({path}: {smallest} rows or "
                             f"inputs); choose --lora-r of at most {smallest}")
    for block in model.blocks:
        for path, slices in by_module.items():
            parent, _, attr = path.rpartition(".")
            holder = block.get_submodule(parent)
            setattr(holder, attr, LoRALinear(getattr(holder, attr), slices, cfg))
    return list(targets)


def lora_layers(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors alone, under the model's own keys ("blocks.0.attn.qkv.lora_A.q", ...)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_adapter_state(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into a model that apply_lora prepared with the same settings; a tensor of another
    shape means the adapter was made for another base, which is said in one line."""
    own = adapter_state(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise LmlabError(f"adapter {source} does not fit this model: "
                         f"{'it lacks ' + missing[0] if missing else 'it has ' + extra[0] + ', which the model lacks'}"
                         "; load it onto the base it was trained for")
    for key, t in state.items():
        if tuple(t.shape) != tuple(own[key].shape):
            raise LmlabError(f"adapter {source} was made for a different base: {key} has shape {tuple(t.shape)}, "
                             f"this model needs {tuple(own[key].shape)}; load it onto the base it was trained for")
    with torch.no_grad():
        for key, t in state.items():
            own[key].copy_(t.to(own[key].dtype))


def merge_lora(model):
    """Fold every adapter into its base layer, in place: the model is plain again (exportable, quantizable)."""
    for name, layer in lora_layers(model).items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer.merged())
    return model
