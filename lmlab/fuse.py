"""Speed-only rewrites of a built model for decoding, applied from outside it as quantization is.

`fuse_gate_up`: a SwiGLU MLP's gate and up projections become one (2 d_ff, C) matmul, so a decoding step reads
its input once and launches one GEMM where it launched two (q, k and v already share one, `Attention.qkv`). The
fused module keeps the unfused one's state-dict keys (gate.*, up.*, down.*) through state-dict hooks, so saving,
exporting or reloading a fused model reads and writes what an unfused one does. Quantized projections of one
form (lmlab.quant.QuantLinear: int8, or int4 of one group size) fuse too, their packed weights and scales stacked
(`QuantLinear.cat`); LoRA-wrapped ones are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model import MLP, Transformer
from lmlab.quant import QuantLinear


class FusedSwiGLU(nn.Module):
    """down(silu(g) * u) with (g, u) the halves of one matmul by cat(gate.weight, up.weight) (2 d_ff, C)."""

    def __init__(self, mlp: MLP, gate_up: nn.Module) -> None:
        super().__init__()
        self.d_ff, self.swiglu = mlp.up.out_features, True
        self.gate_up, self.down = gate_up, mlp.down
        self._register_state_dict_hook(_split_keys)
        self._register_load_state_dict_pre_hook(_join_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split(self.d_ff, dim=-1)  # (B, T, d_ff) each
        return self.down(F.silu(g) * u)


# Each stored tensor of a projection and the dimension its outputs run along (a float weight and bias, a
# QuantLinear's packed codes and scales): the fused tensor is the gate's and the up's stacked along it.
PARTS = {"weight": 0, "bias": 0, **QuantLinear.SPLITS}


def _split_keys(module: FusedSwiGLU, state: dict, prefix: str, local_metadata) -> None:
    for kind, dim in PARTS.items():
        fused = state.pop(f"{prefix}gate_up.{kind}", None)
        if fused is not None:
            state[f"{prefix}gate.{kind}"], state[f"{prefix}up.{kind}"] = fused.chunk(2, dim=dim)  # equal halves


def _join_keys(state: dict, prefix: str, *args) -> None:
    for kind, dim in PARTS.items():
        if f"{prefix}gate.{kind}" in state:
            state[f"{prefix}gate_up.{kind}"] = torch.cat([state.pop(f"{prefix}gate.{kind}"),
                                                          state.pop(f"{prefix}up.{kind}")], dim=dim)


def _gate_up(mlp: MLP) -> nn.Module | None:
    """The fused projection of a SwiGLU's gate and up, or None where they are not of one fusable form."""
    gate, up = mlp.gate, mlp.up
    if type(gate) is QuantLinear and type(up) is QuantLinear:
        return QuantLinear.cat([gate, up])
    if type(gate) is not nn.Linear or type(up) is not nn.Linear:
        return None
    fused = nn.Linear(up.in_features, 2 * up.out_features, bias=up.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([gate.weight.detach(), up.weight.detach()]), requires_grad=False)
    if up.bias is not None:
        fused.bias = nn.Parameter(torch.cat([gate.bias.detach(), up.bias.detach()]), requires_grad=False)
    return fused


def fuse_gate_up(model: Transformer, quantized_only: bool = False) -> int:
    """Fuse every block's SwiGLU gate and up projections in place (float, or quantized alike; `quantized_only`
    leaves float ones as they are: a float model may yet be trained or given LoRA layers, which name gate and
    up); returns how many were fused."""
    return sum(fuse_mlp(block, quantized_only) for block in model.blocks)


def fuse_mlp(block: nn.Module, quantized_only: bool = False) -> bool:
    """Fuse one block's SwiGLU gate and up (see fuse_gate_up); False where there is nothing to fuse. A packed
    load calls it block by block, as soon as a block's gate and up are in: the unfused tensors are freed while
    the heap still has room for them to be reused, where fusing the whole model afterwards left their chunks
    behind (+30 MiB of peak RSS for SmolLM2-135M's 30 layers)."""
    mlp = block.mlp
    if type(mlp) is not MLP or not mlp.swiglu or (quantized_only and type(mlp.up) is not QuantLinear):
        return False
    gate_up = _gate_up(mlp)
    if gate_up is not None:
        block.mlp = FusedSwiGLU(mlp, gate_up)
    return gate_up is not None
