"""Speed-only changes applied to a built model from outside it, as quantization and parallelism are: what they
change is how fast the same numbers come out, never the weights a checkpoint holds.

`pad_vocab`: the output head's matmul runs on a vocabulary padded to a multiple of 64 (nanoGPT pads GPT-2's
50,257 to 50,304 for this; tensor-core GEMMs want dimensions that are multiples of 8 and tile best at 64). The
padding is made per call from the real weight, so the parameter, its tying to the embedding, the optimizer state
and every saved or exported file keep the true vocabulary's shape. Under torch.compile the pad fuses into the bf16
cast autocast makes anyway. Logits come back sliced to the true vocabulary; the training loss reads the padded
ones instead, with the padding's columns at -inf (`PaddedHead.masked`, which the model's loss uses): the same
cross-entropy to the last bit of the log-sum-exp, without the slice. nanoGPT instead trains its 47 padding rows
as real (never-target) tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model import Transformer

PAD_MULTIPLE = 64  # the multiple on CUDA when TrainConfig.pad_vocab is 0 (automatic)


class PaddedHead(nn.Module):
    """A bias-free linear head whose matmul sees (V + pad, C) weights; returns logits (..., V) as the plain head,
    and from `masked` the padded logits (..., V + pad) with columns V.. at -inf.

    It holds the head's own Parameter (so `lm_head.weight` stays the state-dict key, tied to `wte.weight` when
    the model ties them); rows V.. of the padded copy are zeros. The -inf comes in as the matmul's bias (a buffer,
    not saved), which cuBLAS adds in the GEMM's epilogue: no extra pass over the logits. Softmax gives those
    columns exactly 0, so their gradient is 0 and nothing NaN reaches the weights."""

    def __init__(self, head: nn.Linear, multiple: int) -> None:
        super().__init__()
        if head.bias is not None:
            raise ValueError("PaddedHead pads a bias-free head")
        self.weight = head.weight  # (V, C)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.pad = -self.out_features % multiple
        mask = torch.zeros(self.out_features + self.pad, dtype=head.weight.dtype, device=head.weight.device)
        mask[self.out_features:] = float("-inf")
        self.register_buffer("pad_mask", mask, persistent=False)  # (V + pad,)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        w = F.pad(self.weight, (0, 0, 0, self.pad))  # (V + pad, C); its gradient is the padded one's rows :V
        return F.linear(x, w, self.pad_mask)  # (..., V + pad), columns V.. at -inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.pad(self.weight, (0, 0, 0, self.pad))
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


# ---------------------------------------------------------------------------------------------------------
# Float8 training (`--fp8`): torchao's Float8Linear with rowwise scales, on GPUs with FP8 tensor cores.

FP8_CAPABILITY = (8, 9)  # Ada (8.9), Hopper (9.0), Blackwell (10.x): the GPUs whose tensor cores multiply FP8


def fp8_refusal(device: torch.device, capability: tuple[int, int] | None = None, name: str = "") -> str | None:
    """Why `--fp8` cannot run here (one line naming what it needs), or None where it can: a CUDA device of
    compute capability 8.9 or newer. On anything else float8 matmuls are emulated, slower than bf16 ones."""
    needs = ("--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
             "Blackwell)")
    if device.type != "cuda":
        return f"{needs}; this run's device is {device.type}. Drop --fp8 (bf16: --dtype bfloat16)"
    if capability is None:
        capability, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    if tuple(capability) < FP8_CAPABILITY:
        return (f"{needs}; {name or 'this GPU'} is compute capability {capability[0]}.{capability[1]}. Drop --fp8 "
                "(bf16: --dtype bfloat16)")
    return None


def check_fp8(device: torch.device, dtype: str) -> None:
    """Refuse `--fp8` before anything is built where it cannot run: the wrong device, no bf16 autocast (torchao's
    rowwise FP8 matmuls return bf16), or no torchao."""
    from lmlab.errors import LmlabError

    why = fp8_refusal(device)
    if why is not None:
        raise LmlabError(why)
    if dtype != "bfloat16":
        raise LmlabError("--fp8 runs its matmuls in FP8 inside bf16 autocast: add --dtype bfloat16")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise LmlabError("--fp8 trains through torchao's float8 layers, which are not installed: pip install torchao "
                         "(or pip install 'lmlab[fp8]')") from None


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """The linears float8 pays for: the blocks' matrices with both sides multiples of 16 (the FP8 GEMM's
    alignment), never the output head, whose logits feed the loss directly (torchtitan keeps it in bf16 too)."""
    return (type(module) is nn.Linear and not fqn.endswith("lm_head")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def float8_training(model: nn.Module) -> int:
    """Swap the eligible linears of `model` for torchao's Float8Linear with the "rowwise" recipe (one scale per
    row of activations and of weights, dynamic, power-of-2 scales) in place; returns how many were swapped.
    The swapped layers keep their Parameters (state-dict keys, optimizer state and checkpoints are unchanged):
    the weights stay float32 masters, cast to FP8 per matmul. Checked by `check_fp8` first; on a CPU torch
    runs the same arithmetic slowly, which the tests use to compare its losses with bf16's."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    before = sum(type(m) is nn.Linear for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=fp8_eligible)
    return before - sum(type(m) is nn.Linear for m in model.modules())
