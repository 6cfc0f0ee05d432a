"""Speed-only changes applied to a built model from outside it, as quantization and parallelism are: what they
change is how fast the same numbers come out, never the weights a checkpoint holds.

`pad_vocab`: the output head's matmul runs on a vocabulary padded to a multiple of 64 (nanoGPT pads GPT-2's
50,257 to 50,304 for this; tensor-core GEMMs want dimensions that are multiples of 8 and tile best at 64), and its
logits are sliced back. The padding is made per call from the real weight, so the parameter, its tying to the
embedding, the optimizer state and every saved or exported file keep the true vocabulary's shape. Under
torch.compile the pad fuses into the bf16 cast autocast makes anyway.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model import Transformer

PAD_MULTIPLE = 64  # the multiple on CUDA when TrainConfig.pad_vocab is 0 (automatic)


class PaddedHead(nn.Module):
    """A bias-free linear head whose matmul sees (V + pad, C) weights; returns logits (..., V) as the plain head.

    It holds the head's own Parameter (so `lm_head.weight` stays the state-dict key, tied to `wte.weight` when
    the model ties them); rows V.. of the padded copy are zeros, and their logits are dropped."""

    def __init__(self, head: nn.Linear, multiple: int) -> None:
        super().__init__()
        if head.bias is not None:
            raise ValueError("PaddedHead pads a bias-free head")
        self.weight = head.weight  # (V, C)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.pad = -self.out_features % multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.pad(self.weight, (0, 0, 0, self.pad))  # (V + pad, C); its gradient is the padded one's rows :V
        return F.linear(x, w)[..., :self.out_features]  # (..., V)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, padded_by={self.pad}"


def vocab_multiple(setting: int, device: torch.device) -> int:
    """The multiple to pad the vocabulary to: the setting, or with 0 (automatic) 64 on CUDA and 1 (no padding)
    elsewhere: on a CPU the padded columns are plain extra work (65 characters would become 128)."""
    if setting:
        return setting
    return PAD_MULTIPLE if device.type == "cuda" else 1


def pad_vocab(model: Transformer, multiple: int) -> Transformer:
    """Swap `model.lm_head` for a PaddedHead when its vocabulary is not already a multiple of `multiple`.
    In place (the same model is returned); a no-op for multiple 1 or an aligned vocabulary."""
    head = model.lm_head
    if multiple > 1 and isinstance(head, nn.Linear) and head.out_features % multiple:
        model.lm_head = PaddedHead(head, multiple)
    return model
