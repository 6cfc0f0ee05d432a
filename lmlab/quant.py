"""Weight-only quantized layers for inference: int8 with one scale per output channel, int4 with a scale and an
offset per group of input columns.

Why weight-only: decoding one token reads every weight once and does two FLOPs with each, so on a CPU it is bound
by memory bandwidth, and 8 or 4 bits a weight read 4x or 8x fewer bytes than float32. The matmuls are PyTorch's
own kernels, `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` (gpt-fast's int8 and int4 paths).
Measured on a 2-core AVX2 EPYC at batch 1 (benchmarks/quant_kernels.py), both are 2-4x faster than a float32
F.linear when the activations are bfloat16, and 5-10x slower when they are float32. So each quantized layer casts
its input to bfloat16 for the matmul and its output back; everything else (norms, attention, the KV cache, the
residual stream) stays in the model's dtype, and an output head recomputes its top logits in float32
(`QuantLinear.exact_top`), since the kernel's bf16 outputs flip near-tied greedy choices.

Formats, N output rows, K input columns, g the group size:
    int8: codes int8 (N, K) in [-127, 127], weight = codes * scale[n]              (scale (N,))
    int4: codes 0..15 (N, K),               weight = codes * scale[n, j] + offset[n, j]   for column group j
The int4 kernel wants its codes packed in its own tiled layout and scale/offset as `(q - 8) * s + z` in a
(K/g, N, 2) table, so an int4 layer keeps only that form; `dequantize_t()` unpacks it from the kernel's tiles.
GGUF files' Q4_0, Q4_1 and Q4_K blocks are exactly int4 groups of 32 (`from_int4`), so they load without a float
copy (weights/gguf.py).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError

QUANT_MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # int4 groups the kernels take
GROUP_SIZE = 32  # the default: llama.cpp's Q4_0 block, the finest (most accurate) of them
COMPUTE_DTYPE = torch.bfloat16  # the activations' dtype inside the kernels: see the module docstring


# From this many rows of input on, unpacking the weight and running a float GEMM beats the int kernels on an AVX2 CPU,
# where their time grows in step with the rows (~20 us a row for a 1536 x 576 weight, int8 or int4, on the 2-core
# AVX2 box): the crossovers measured with benchmarks/quant_kernels.py for SmolLM2's layers lie between 64 and 96 rows
# for int8 and near 64 for int4. (For a 49152 x 576 head they lie higher, ~160 rows for int8: its unpacked float copy
# no longer fits in cache; only an eval runs a head over that many rows, and at 512 the GEMM wins again.)
# torch's AVX-512 build of the kernels is another matter: on a 2-core Zen 4 they ran at 300-350 GFLOP/s from 32 rows
# to 512, for SmolLM2's shapes and Llama-3.1-8B's alike, 2-10x the unpack and float32 GEMM (benchmarks/results.md),
# so there they take every row count. The table is chosen once, from the vector extensions torch dispatches to here.
# Only inputs of more than one token per sequence (prefill, eval) switch: a decoding step, one token per row, always
# takes the kernel, which computes every row alike whatever the batch, so a row's logits do not depend on how many
# others share its step (the server's seeded requests; a 16-row step once switched the int8 head to the GEMM).
AVX2_GEMM_ROWS = {"int8": 80, "int4": 64}
NEVER = sys.maxsize


def gemm_rows_for(capability: str) -> dict[str, int]:
    """The GEMM switch for a CPU whose vector extensions torch names `capability` (torch.backends.cpu)."""
    return {"int8": NEVER, "int4": NEVER} if capability.startswith("AVX512") else dict(AVX2_GEMM_ROWS)


GEMM_ROWS = gemm_rows_for(torch.backends.cpu.get_cpu_capability())


def kernel_description(mode: str) -> str:
    """Which matmuls a `mode` layer runs on this machine, for reports (lmlab bench generate names it)."""
    kernel = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"
    cap = torch.backends.cpu.get_cpu_capability()
    if GEMM_ROWS[mode] == NEVER:
        return f"{kernel} ({cap}) at every row count"
    return f"{kernel} ({cap}) below {GEMM_ROWS[mode]} rows a prefill, unpacked float GEMM from there"


@functools.cache
def int4_layout() -> tuple[int, torch.Tensor] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out its nibbles on this machine, found by packing index
    digits: (rows per block BN, the order of those rows among the block's nibbles), for a layout of the form
    [N / BN][K][BN nibbles]; None for another form (the unpacking then goes through the kernel)."""
    N, K = 128, 64
    idx = torch.arange(N * K).view(N, K)
    src = torch.zeros(N * K, dtype=torch.long)
    for d in range(4):  # 4 hex digits name each of the 8192 positions
        packed = torch._convert_weight_to_int4pack_for_cpu(((idx >> (4 * d)) & 15).int(), 1).reshape(-1)
        src += torch.stack((packed & 15, packed >> 4), -1).reshape(-1).long() << (4 * d)
    n, k = src // K, src % K
    for BN in (16, 32, 64, 128):
        rows = n[:BN]
        blocks, cols = torch.arange(N // BN)[:, None, None], torch.arange(K)[None, :, None]
        want_n = (blocks * BN + rows[None, None, :]).expand(N // BN, K, BN).reshape(-1)
        if torch.equal(want_n, n) and torch.equal(cols.expand(N // BN, K, BN).reshape(-1), k):
            return BN, torch.argsort(rows)
    return None


@functools.cache
def halves_block() -> int | None:
    """BN when the kernel packs each block's rows 0..BN/2-1 into the low nibbles and BN/2.. into the high ones
    (the layout torch uses on x86), so unpacking is two masks and a concatenation; None otherwise."""
    layout = int4_layout()
    if layout is None:
        return None
    BN, order = layout
    return BN if torch.equal(order, torch.arange(BN).view(-1, 2).t().reshape(-1)) else None


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor | None:
    """The (N, K) codes 0..15 of a kernel-packed int4 weight, or None where the layout is unknown."""
    layout = int4_layout()
    if layout is None or N % layout[0]:
        return None
    BN, order = layout
    b = packed.reshape(N // BN, K, BN // 2)
    if halves_block() == BN:  # low nibbles: rows 0.., high: BN/2..
        nibbles = torch.cat((b & 15, b >> 4), dim=-1)  # (N/BN, K, BN) in row order, without a gather
    else:
        nibbles = torch.stack((b & 15, b >> 4), dim=-1).reshape(N // BN, K, BN)[..., order.to(packed.device)]
    return nibbles.transpose(1, 2).reshape(N, K)


def head_mode(mode: str | None) -> str | None:
    """The output head's form for a model quantized to `mode`: int4 models keep an int8 head, as llama.cpp keeps
    a Q4 file's output matrix at 6 bits, since the logits are the most sensitive matmul."""
    return "int8" if mode == "int4" else mode


def check_mode(mode: str, group_size: int = GROUP_SIZE) -> None:
    """One line for a mode or group size this module cannot do."""
    if mode not in QUANT_MODES:
        raise LmlabError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANT_MODES)} "
                         "(or off, to dequantize to float)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES[:-1])) + f" or {GROUP_SIZES[-1]}"
        raise LmlabError(f"int4 group size must be {sizes} (the kernel's sizes), got {group_size!r}")


def check_device(device: torch.device) -> None:
    """The int4 and int8 kernels used here exist for CPU tensors, and torchao's for CUDA (`quantize_torchao`);
    say so before anything is converted."""
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            import torchao.quantization  # noqa: F401
        except ImportError:
            raise LmlabError("--quantize on CUDA runs through torchao's weight-only layers, which are not installed: "
                             "pip install torchao (or --quantize off)") from None
    elif kind != "cpu":
        raise LmlabError(f"quantized inference runs on the CPU and on CUDA GPUs, not on {kind}; use --device cpu, "
                         "or --quantize off to run in float on this device")


def quantize_torchao(model, mode: str, group_size: int = GROUP_SIZE):
    """torchao's weight-only quantization of every linear layer, the head included (the CUDA path of
    `quantize_model`): int8 with one scale per output channel (Int8WeightOnlyConfig), or int4 in groups of
    `group_size` (Int4WeightOnlyConfig, bf16 activations). The float weights are replaced in place; torchao's
    tensor subclasses pick their CUDA kernels (and run on CPU too, as the tests use them there)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if mode == "int4" and model.norm_f.weight.dtype != torch.bfloat16:
        raise LmlabError("--quantize int4 on CUDA runs torchao's int4 kernels on bfloat16 activations: add --dtype "
                         "bfloat16")
    config = Int8WeightOnlyConfig() if mode == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return model.eval()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (codes (N, K) int8, scale (N,) float32), scale = max|w| / 127 per row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` columns: (codes (N, K) uint8 in 0..15, scale, offset (N, K/g)),
    the group's minimum mapped to code 0 and its maximum to 15."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.reshape(N, K), scale, lo


def check_shape(name: str, N: int, K: int, mode: str, group_size: int) -> None:
    if mode == "int4" and (K % group_size or N % 16):
        raise LmlabError(f"cannot quantize {name} ({N} x {K}) to int4 with group size {group_size}: its input size "
                         f"must be a multiple of the group size and its output size a multiple of 16; choose "
                         "another --group-size, or --quantize int8")


# An int8 output head recomputes this many of each row's largest logits exactly (see QuantLinear.exact_top).
EXACT_TOP = 32


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as int8 or int4 codes (see the module docstring); a drop-in for nn.Linear.

    `exact_top` (0: off; set on a model's int8 output head) makes the kernel path recompute each row's
    `exact_top` largest outputs in float32 from their int8 rows. The kernel rounds its bf16 inputs and, worse, its
    bf16 outputs: logits near 20 come back on a grid of 0.125. On SmolLM2-135M-Instruct's head that moved logits
    by up to 0.18 on the top 20 and changed the greedy token at 23 of 1,024 positions of held-out text against the
    same int8 weights computed in float32 (benchmarks/head_exactness.py); the candidates that can win are near the
    top, so recomputing the top 32 (a top-k and a gather of 32 rows: 1-2% of a decoding step at batch 1 and 8)
    makes the greedy choices and the top probabilities those of the stored weights (0 of those 1,024 differ)."""

    exact_top: int = 0

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_int8(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
        layer = cls(codes.shape[1], codes.shape[0], "int8", codes.shape[1], bias)
        layer.register_buffer("weight", codes.to(torch.int8).contiguous())
        layer.register_buffer("scale", scale.to(COMPUTE_DTYPE).contiguous())
        return layer

    @classmethod
    def from_int4(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  bias: torch.Tensor | None = None) -> QuantLinear:
        N, K = codes.shape
        group_size = K // scale.shape[1]
        layer = cls(K, N, "int4", group_size, bias)
        # The kernel computes (q - 8) * s + z: z = offset + 8 * s gives codes * scale + offset.
        table = torch.stack((scale.float().t(), (offset.float() + 8 * scale.float()).t()), dim=-1)
        layer.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        layer.register_buffer("scales_zeros", table.to(COMPUTE_DTYPE).contiguous())  # (K/g, N, 2)
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str,
                   group_size: int = GROUP_SIZE) -> QuantLinear:
        if mode == "int8":
            return cls.from_int8(*quantize_int8(weight), bias)
        return cls.from_int4(*quantize_int4(weight, group_size), bias)

    @classmethod
    def cat(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """One layer whose outputs are `layers`' outputs side by side (a SwiGLU's gate and up, read with one kernel
        call), or None where they cannot share one: another mode, group size or input size, a bias, or an int4
        output size off the kernel's row blocks. Each output column is computed as before, bit for bit: the int4
        tiles hold whole blocks of rows, so the packed weights stack as they are, and so do their scales."""
        first = layers[0]
        same = all((m.mode, m.group_size, m.in_features) == (first.mode, first.group_size, first.in_features)
                   for m in layers)
        BN = (int4_layout() or (0,))[0] if first.mode == "int4" else 1
        if not same or any(m.bias is not None for m in layers) or not BN or any(m.out_features % BN for m in layers):
            return None
        layer = cls(first.in_features, sum(m.out_features for m in layers), first.mode, first.group_size, None)
        for name, dim in cls.SPLITS.items():
            if hasattr(first, name):
                layer.register_buffer(name, torch.cat([getattr(m, name) for m in layers], dim=dim))
        return layer

    SPLITS = {"weight": 0, "scale": 0, "scales_zeros": 1}  # each buffer's output dimension

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        decoding = x.dim() > 2 and x.shape[-2] == 1
        if not decoding and x2.shape[0] >= GEMM_ROWS[self.mode]:  # a prefill or an eval batch: a float GEMM
            y = x2 @ self.dequantize_t().to(x.dtype)
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.to(COMPUTE_DTYPE), self.weight, self.scale).to(x.dtype)
            if self.exact_top:
                y = self._recompute_top(x2, y)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(COMPUTE_DTYPE), self.weight, self.group_size,
                                                  self.scales_zeros).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _recompute_top(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y with each row's `exact_top` largest entries recomputed from their int8 rows in x2's dtype."""
        top = y.topk(min(self.exact_top, self.out_features), dim=-1).indices  # (R, k)
        # (R, k) dot products as a multiply and a sum, not a bmm, whose result for a row changes with the batch
        dots = (self.weight[top].to(x2.dtype) * x2[:, None, :]).sum(-1)
        return y.scatter_(-1, top, dots * self.scale[top].to(x2.dtype))

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight this layer computes with (its scales as the kernel holds them, in bf16)."""
        if self.mode == "int8":
            return self.weight.float() * self.scale.float()[:, None]
        return self.dequantize_t().t().contiguous()

    def dequantize_t(self) -> torch.Tensor:
        """The float32 weight transposed, (K, N), as the GEMM of a prefill reads it. For int4 this is the order the
        kernel's tiles already hold: [N/BN][K][BN] codes are W^T in column blocks, so they are converted straight
        into (K, N) with no transposing copy, then scaled and shifted in place, where the kernel's (K/g, N) table
        of scales broadcasts along contiguous rows. Plain passes (copy, mul_, add_) beat one mixed-dtype addcmul of
        the uint8 codes, which TensorIterator runs on a slow path: 1.2x faster for a 1536 x 576 weight (422 against
        501 us, medians of 200 alternating calls on this project's 2-core AVX2 box), and that addcmul was itself
        1.5x faster than unpacking to (N, K) first."""
        if self.mode == "int8":
            return self.dequantize().t()
        N, K, g = self.out_features, self.in_features, self.group_size
        BN = halves_block()
        if BN is None or N % BN:
            codes = unpack_int4(self.weight, N, K)
            if codes is None:  # a layout we do not know: read the weight through the kernel (exact, but K x K work)
                eye = torch.eye(K, device=self.weight.device)
                return torch._weight_int4pack_mm_for_cpu(eye, self.weight, g, self.scales_zeros.float())
            codes = codes.t()
        else:
            b = self.weight.reshape(N // BN, K, BN // 2)
            codes = torch.cat((b & 15, b >> 4), dim=-1).transpose(0, 1)  # (K, N/BN, BN): rows 0.. low, BN/2.. high
        table = self.scales_zeros.float()  # (K/g, N, 2): s, z with w = (q - 8) * s + z
        s = table[..., 0].contiguous()
        shift = torch.add(table[..., 1], s, alpha=-8)  # w = q * s + (z - 8 s)
        out = torch.empty(K, N, dtype=torch.float32, device=self.weight.device)
        out.view_as(codes).copy_(codes)
        out.view(K // g, g, N).mul_(s[:, None]).add_(shift[:, None])
        return out

    def weight_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.in_features}, {self.out_features}, mode={self.mode}{group}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """A token-embedding table held as int8 rows (one scale per row) or int4 groups; a lookup dequantizes only the
    rows it gathers. int4 codes are stored two to a byte (even column in the low nibble)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.mode = "int8" if offset is None else "int4"
        if offset is not None:
            codes = codes.to(torch.uint8)
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
            self.register_buffer("offset", offset.float().contiguous())
        self.register_buffer("weight", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str, group_size: int = GROUP_SIZE) -> QuantEmbedding:
        if mode == "int8":
            return cls(*quantize_int8(weight), None)
        return cls(*quantize_int4(weight, group_size))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        codes, scale = F.embedding(idx, self.weight), F.embedding(idx, self.scale[:, None] if self.mode == "int8"
                                                                   else self.scale)
        if self.mode == "int8":
            return codes.float() * scale
        values = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).float()  # (..., C)
        groups = values.unflatten(-1, (scale.shape[-1], -1))
        out = groups * scale[..., None] + F.embedding(idx, self.offset)[..., None]
        return out.flatten(-2)

    def dequantize(self) -> torch.Tensor:
        return self(torch.arange(self.num_embeddings, device=self.weight.device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}"


def quantize_model(model, mode: str, group_size: int = GROUP_SIZE):
    """Replace, in place, every linear layer of the blocks with a QuantLinear of `mode`, the head with one of
    `head_mode(mode)` and the token embedding with int8 rows. Returns the model (eval mode)."""
    check_mode(mode, group_size)
    check_device(model.wte.weight.device)
    if model.wte.weight.device.type == "cuda":
        return quantize_torchao(model, mode, group_size)
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    for name, m in todo:
        check_shape(name, m.out_features, m.in_features, mode, group_size)
    for name, m in todo:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantLinear.from_float(m.weight.data, m.bias, mode, group_size))
    if isinstance(model.wte, nn.Embedding):
        model.wte = QuantEmbedding.from_float(model.wte.weight.data, "int8")
    head = model.lm_head
    if isinstance(head, nn.Linear) and model.cfg.tie_embeddings and head.bias is None:
        model.lm_head = QuantLinear.from_int8(model.wte.weight, model.wte.scale)  # the same int8 table, once
    elif isinstance(head, nn.Linear):
        model.lm_head = QuantLinear.from_float(head.weight.data, head.bias, head_mode(mode), group_size)
    exact_head(model)
    return model.eval()


def exact_head(model) -> None:
    """Have an int8 output head recompute its top logits exactly (QuantLinear.exact_top); int4 heads, which only
    a file storing its output matrix at 4 bits gives, keep the kernel's outputs."""
    if isinstance(model.lm_head, QuantLinear) and model.lm_head.mode == "int8":
        model.lm_head.exact_top = EXACT_TOP


def weight_bytes(model) -> int:
    """Bytes of the weights one decoded token reads: every matmul's weight once, at its stored size (the
    embedding lookup reads one row and is left out)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear):
            total += m.weight.nbytes
    return total


def kernels_description(model) -> str:
    """The quantized matmuls' kernels of `model` on this machine ("" for a float model)."""
    modes = dict.fromkeys(m.mode for m in model.modules() if isinstance(m, QuantLinear))
    return "; ".join(f"{mode}: {kernel_description(mode)}" for mode in modes)


def weights_description(model) -> str:
    """How the matmul weights are held, for reports: "float32", "int8", "int4 (group 32) + int8", ..."""
    kinds = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            kind = f"int4 (group {m.group_size})" if m.mode == "int4" else "int8"
        elif isinstance(m, nn.Linear):
            kind = str(m.weight.dtype).removeprefix("torch.")
        else:
            continue
        if kind not in kinds:
            kinds.append(kind)
    return " + ".join(kinds)
