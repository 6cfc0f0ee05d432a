"""Speed-only rewrites of a built float model for decoding, applied from outside it as quantization is.

`fuse_gate_up`: a SwiGLU MLP's gate and up projections become one (2 d_ff, C) matmul, so a decoding step reads
its input once and launches one GEMM where it launched two (q, k and v already share one, `Attention.qkv`). The
fused module keeps the unfused one's state-dict keys (gate.*, up.*, down.*) through state-dict hooks, so saving,
exporting or reloading a fused model reads and writes what an unfused one does. Quantized or LoRA-wrapped
projections are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model import MLP, Transformer


class FusedSwiGLU(nn.Module):
    """down(silu(g) * u) with (g, u) the halves of one matmul by cat(gate.weight, up.weight) (2 d_ff, C)."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        gate, up = mlp.gate, mlp.up
        self.d_ff, self.swiglu = up.out_features, True
        self.gate_up = nn.Linear(up.in_features, 2 * self.d_ff, bias=up.bias is not None, device="meta")
        self.gate_up.weight = nn.Parameter(torch.cat([gate.weight.detach(), up.weight.detach()]),
                                           requires_grad=False)
        if up.bias is not None:
            self.gate_up.bias = nn.Parameter(torch.cat([gate.bias.detach(), up.bias.detach()]), requires_grad=False)
        self.down = mlp.down
        self._register_state_dict_hook(_split_keys)
        self._register_load_state_dict_pre_hook(_join_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split(self.d_ff, dim=-1)  # (B, T, d_ff) each
        return self.down(F.silu(g) * u)


def _split_keys(module: FusedSwiGLU, state: dict, prefix: str, local_metadata) -> None:
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}gate_up.{kind}", None)
        if fused is not None:
            state[f"{prefix}gate.{kind}"], state[f"{prefix}up.{kind}"] = fused.split(module.d_ff)


def _join_keys(state: dict, prefix: str, *args) -> None:
    for kind in ("weight", "bias"):
        if f"{prefix}gate.{kind}" in state:
            state[f"{prefix}gate_up.{kind}"] = torch.cat([state.pop(f"{prefix}gate.{kind}"),
                                                          state.pop(f"{prefix}up.{kind}")])


def fuse_gate_up(model: Transformer) -> int:
    """Fuse every block's float SwiGLU gate and up projections in place; returns how many were fused."""
    n = 0
    for block in model.blocks:
        mlp = block.mlp
        if type(mlp) is MLP and mlp.swiglu and type(mlp.gate) is nn.Linear and type(mlp.up) is nn.Linear:
            block.mlp = FusedSwiGLU(mlp)
            n += 1
    return n
