"""Model configuration: one frozen dataclass for the GPT-2 and Llama families, and the named presets.

Every architectural knob lives here once, is validated once in `__post_init__`, and reaches the model
only through this object. The two families differ only in field values (litgpt's approach):

    GPT-2 (Radford et al. 2019)  pos=learned  norm=layernorm  mlp=gelu    bias=True   tie_embeddings=True
    Llama (Touvron et al. 2023)  pos=rope     norm=rmsnorm    mlp=swiglu  bias=False  n_kv_heads < n_heads

`family` picks those defaults; any field given explicitly wins. Presets give the published shapes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError, closest, unknown
from lmlab.utils import read_json, read_text


def knob(default: Any = dataclasses.MISSING, help: str = "", repeat: bool = False, **kw: Any) -> Any:
    """A config field with its help text beside it: the command line's flag for it (lmlab.cli) says this; a tuple
    field's flag is repeated (`repeat`) or comma-separated."""
    return field(default=default, metadata={"help": help, "repeat": repeat}, **kw)


# Where a default context is "the model's, at most this": SmolLM2's 8K windows cost 8x the attention of 1K ones.
MAX_DEFAULT_CONTEXT = 1024
# The server's default window, "the model's context, at most this": its static KV cache holds max_batch rows of it
# (for SmolLM2-135M, 94 MB per row at 2048), allocated when it starts.
SERVE_MAX_DEFAULT_CONTEXT = 2048

FAMILIES = ("gpt2", "llama")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("none", "llama3")
INITS = ("gpt2", "xavier", "orthogonal")

# What `family` implies for fields left unset (None).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5),
}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one decoder-only Transformer. Unset (None) fields take the family's default."""

    family: str = "gpt2"
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768  # embedding (residual stream) width
    d_ff: int | None = None  # MLP hidden width; default 4*d_model (gelu) or Llama's 8/3 rule (swiglu)
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # < n_heads means grouped-query attention; default n_heads
    bias: bool | None = None  # biases in every linear layer and norm, as GPT-2 has
    qkv_bias: bool | None = None  # biases on q/k/v alone (Qwen-style); default = bias
    norm: str | None = None
    norm_eps: float | None = None
    pos: str | None = None
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "llama3": Llama 3.1's frequency-dependent context extension
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    mlp: str | None = None
    tie_embeddings: bool | None = None
    dropout: float = 0.0  # default rate for every dropout site
    dropout_embed: float | None = None  # on token + position embeddings
    dropout_attn: float | None = None  # on the attention probabilities
    dropout_resid: float | None = None  # on each sub-layer output before the residual add

    def __post_init__(self) -> None:
        check_types(self)
        if self.family not in FAMILIES:
            raise unknown("family", self.family, FAMILIES)
        resolved = dict(FAMILY_DEFAULTS[self.family])
        resolved["n_kv_heads"] = self.n_heads
        for site in ("dropout_embed", "dropout_attn", "dropout_resid"):
            resolved[site] = self.dropout
        for name, default in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", default_d_ff(self.d_model, self.mlp))
        self._validate()

    def _validate(self) -> None:
        check_types(self)  # again: the family's defaults have filled the None fields
        for name in ("vocab_size", "context_length", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads",
                     "rope_original_context"):
            if getattr(self, name) < 1:
                raise LmlabError(f"must be a positive integer, got {getattr(self, name)!r}", name)
        for name, choices in (("norm", NORMS), ("pos", POSITIONS), ("mlp", MLPS), ("rope_scaling", ROPE_SCALINGS)):
            if getattr(self, name) not in choices:
                raise unknown(f"config value for {name}:", getattr(self, name), choices)
        for name in ("dropout", "dropout_embed", "dropout_attn", "dropout_resid"):
            check_rate(name, getattr(self, name))
        for name in ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            if not getattr(self, name) > 0:
                raise LmlabError(f"must be a positive number, got {getattr(self, name)!r}", name)
        if self.d_model % self.n_heads:
            raise LmlabError(f"config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise LmlabError(f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.pos == "rope" and self.head_dim % 2:
            raise LmlabError(f"config: rope needs an even head dimension, got d_model/n_heads = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, validated again. Unknown names get a suggestion.

        Fields that were following a default keep following it: changing `n_heads` of a config whose
        `n_kv_heads` equalled `n_heads` moves both, and changing `dropout` moves every site still at it.
        """
        check_keys(changes, ModelConfig)
        d = self.to_dict()
        following = dict(FAMILY_DEFAULTS[self.family], n_kv_heads=self.n_heads, qkv_bias=self.bias,
                         d_ff=default_d_ff(self.d_model, self.mlp), dropout_embed=self.dropout,
                         dropout_attn=self.dropout, dropout_resid=self.dropout)
        for name, default in following.items():
            if name not in changes and d[name] == default:
                d[name] = None
        d.update(changes)
        return ModelConfig(**d)

    def described(self) -> dict[str, Any]:
        """The fields that shape this architecture (`lmlab info`): rotary knobs only where positions are rotary,
        and Llama 3.1's scaling knobs only where that scaling is on; head_dim added."""
        out = {}
        for key, value in self.to_dict().items():
            scaling_knob = key.startswith("rope_") and key not in ("rope_theta", "rope_scaling")
            if (key.startswith("rope_") and self.pos != "rope") or (scaling_knob and self.rope_scaling == "none"):
                continue
            out[key] = value
        return {**out, "head_dim": self.head_dim}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        check_keys(d, cls)
        return cls(**d)

    def num_params(self) -> int:
        """Exact parameter count, computed from the shapes (the model's own count must agree)."""
        d, ff, hd = self.d_model, self.d_ff, self.head_dim
        n_norm = 2 if (self.norm == "layernorm" and self.bias) else 1
        qkv = d * (self.n_heads + 2 * self.n_kv_heads) * hd + (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias
        attn = qkv + d * d + d * self.bias
        n_up = 2 if self.mlp == "swiglu" else 1
        mlp = n_up * (d * ff + ff * self.bias) + ff * d + d * self.bias
        block = attn + mlp + 2 * n_norm * d
        emb = self.vocab_size * d + (self.context_length * d if self.pos == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return emb + self.n_layers * block + n_norm * d + head


def default_d_ff(d_model: int, mlp: str | None) -> int:
    """4*d for GELU; for SwiGLU, Llama's 2/3 * 4d rounded up to a multiple of 256 (same FLOPs as 4d GELU)."""
    if mlp == "swiglu":
        return 256 * math.ceil(int(8 * d_model / 3) / 256)
    return 4 * d_model


KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_types(obj: Any) -> None:
    """Every field of dataclass `obj` holds what its annotation says, checked once for every field (a config file
    can hold "0.9" or [1] anywhere): ints are ints (not bools), floats are finite numbers (an int is made a float),
    None only where the annotation allows it. The range checks that follow can then compare safely."""
    for f in fields(obj):
        value, kinds = getattr(obj, f.name), str(f.type).replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        if "float" in kinds and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise LmlabError(f"must be a finite number, got {value!r}", f.name) from None
            object.__setattr__(obj, f.name, value)
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value))
        if kind not in kinds:
            wanted = " or ".join(KINDS[k] for k in kinds if k in KINDS)
            raise LmlabError(f"must be {wanted}, got {value!r}", f.name)
        if kind == "float" and not math.isfinite(value):
            raise LmlabError(f"must be a finite number, got {value!r}", f.name)


def check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise LmlabError(f"must be a rate in [0, 1), got {value!r}", name)


def check_keys(d: dict[str, Any], *classes: type) -> None:
    """Every key of `d` names a field of one of the dataclasses `classes`; the nearest name is suggested."""
    names = [f.name for cls in classes for f in fields(cls)]
    for key in d:
        if key not in names:
            raise LmlabError(f"unknown config key {key!r}{closest(str(key), names)}")


PRESETS: dict[str, ModelConfig] = {
    # GPT-2 paper sizes (Radford et al. 2019, table 2), with OpenAI's released vocabulary and context.
    "gpt2-124m": ModelConfig(family="gpt2", n_layers=12, n_heads=12, d_model=768),
    "gpt2-355m": ModelConfig(family="gpt2", n_layers=24, n_heads=16, d_model=1024),
    "gpt2-774m": ModelConfig(family="gpt2", n_layers=36, n_heads=20, d_model=1280),
    "gpt2-1558m": ModelConfig(family="gpt2", n_layers=48, n_heads=25, d_model=1600),
    # Llama-family shapes, from each model's published config.json.
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, context_length=8192, d_model=576, d_ff=1536, n_layers=30, n_heads=9,
        n_kv_heads=3, rope_theta=100000.0, tie_embeddings=True),
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, context_length=131072, d_model=2048, d_ff=8192, n_layers=16, n_heads=32,
        n_kv_heads=8, rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0, tie_embeddings=True),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, context_length=131072, d_model=4096, d_ff=14336, n_layers=32, n_heads=32,
        n_kv_heads=8, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0, tie_embeddings=False),
    # Small CPU presets. vocab_size is a placeholder: training replaces it with the tokenizer's.
    # char-baby is nanoGPT's shakespeare_char "baby GPT"; char-cpu its README's CPU-sized variant, with one
    # change: an untied output head. With 65 characters tying saves only 8k weights, and untied reached a
    # lower val loss on tinyshakespeare in 2000 steps in every seed we ran (benchmarks/char_cpu.md).
    "char-baby": ModelConfig(
        family="gpt2", vocab_size=65, context_length=256, d_model=384, n_layers=6, n_heads=6, bias=False,
        dropout=0.2),
    "char-cpu": ModelConfig(
        family="gpt2", vocab_size=65, context_length=64, d_model=128, n_layers=4, n_heads=4, bias=False, dropout=0.0,
        tie_embeddings=False),
    "llama-cpu": ModelConfig(
        family="llama", vocab_size=65, context_length=64, d_model=128, d_ff=352, n_layers=4, n_heads=4, n_kv_heads=2,
        tie_embeddings=True),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    return PRESETS[name]


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "muon", "lbfgs")
SCHEDULES = ("constant", "cosine", "linear", "wsd", "step")
DROPOUT_SCHEDULES = ("constant", "early", "late", "linear")
SAMPLINGS = ("random", "epoch")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer, schedules, batching, evaluation and run settings. Validated once.

    Defaults reproduce nanoGPT's CPU "baby GPT" run on characters (AdamW, lr 1e-3 cosine to 1e-4, warmup 100,
    beta2 0.99, weight decay 0.1, clip 1.0, batch 12, 2000 steps)."""

    # optimizer (Deep Learning book ch. 8 + Muon); all from torch.optim
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float | None = None  # where decaying schedules end; default lr / 10 (at most lr)
    weight_decay: float = 0.1  # on matrices and embeddings (p.dim() >= 2) only
    beta1: float = 0.9  # adam/adamw, and muon's AdamW part; rmsprop ignores it
    beta2: float = 0.99  # adam/adamw and muon's AdamW part; rmsprop's smoothing constant alpha
    momentum: float = 0.9  # momentum and nesterov only: rmsprop runs without momentum, muon has its own
    muon_momentum: float = 0.95  # muon's Nesterov momentum on the hidden matrices (Jordan et al.'s 0.95)
    lbfgs_max_iter: int = 5  # lbfgs: iterations (and line searches) per optimizer step
    lbfgs_history: int = 20  # lbfgs: the curvature pairs it keeps
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # learning-rate schedule
    schedule: str = "cosine"
    warmup_steps: int = 100  # linear warmup from 0 (every schedule)
    decay_fraction: float = 0.2  # wsd: the final fraction of steps spent decaying to min_lr
    step_every: int = 0  # step: multiply lr by step_gamma every this many steps; 0 = max_steps // 3
    step_gamma: float = 0.1
    # initialization and dropout over time
    init: str = "gpt2"
    dropout_schedule: str = "constant"
    dropout_until: float = 0.2  # early: dropout only before this fraction of steps; late: only after it
    # batching
    batch_size: int = 12  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000  # 0 = no step limit (then max_tokens must be set)
    max_tokens: int = 0  # stop once this many training tokens are seen; 0 = no token limit
    sampling: str = "random"  # random windows, or each window once per shuffled epoch
    # evaluation, early stopping, logging
    eval_interval: int = 250
    eval_batches: int = 50  # fixed, deterministic subsets of val and train, in eval mode
    # windows per evaluation forward pass; 0 = batch_size. The same eval_batches x batch_size windows, regrouped:
    # fewer, larger no-grad passes (the mean is the same to float rounding)
    eval_batch_size: int = 0
    # false: an evaluation's train loss is the mean training loss since the previous evaluation (train mode,
    # dropout on), which costs nothing, instead of eval_batches passes over fixed train windows
    eval_train: bool = True
    patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    min_delta: float = 0.0  # the improvement in val loss that counts
    log_interval: int = 10
    # run settings
    seed: int = 1337
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # or bfloat16: autocast (weights and optimizer state stay float32)
    compile: bool = False
    # pad the output head's matmul to a multiple of this many vocabulary rows (logits sliced back; checkpoints keep
    # the true vocabulary); 0 = automatic: 64 on CUDA, none elsewhere; 1 = never (lmlab/training/fastpath.py)
    pad_vocab: int = 0
    # CPU intra-op threads; 0 = torch's default (one per core). On a machine other jobs share, 1 can be many times
    # faster: a thread that loses its core stalls every parallel op of the step (benchmarks/char_cpu.md)
    threads: int = 0
    fsdp: bool = False  # under torchrun: shard with FSDP2 (fully_shard) instead of DDP
    # the blocks' matmuls in FP8 (torchao float8 training, rowwise scales); CUDA compute capability 8.9+ and
    # dtype bfloat16 only (lmlab/training/fastpath.py)
    fp8: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("init", INITS),
                              ("dropout_schedule", DROPOUT_SCHEDULES), ("sampling", SAMPLINGS)):
            if getattr(self, name) not in choices:
                raise unknown(name, getattr(self, name), choices)
        if not self.lr > 0:
            raise LmlabError(f"must be positive, got {self.lr!r}", "lr")
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        if self.min_lr > self.lr:  # the "decay" would rise: a typo, not a schedule
            raise LmlabError(f"({self.min_lr:g}) must not exceed lr ({self.lr:g}): decaying schedules end at min_lr",
                             "min_lr")
        for name in ("min_lr", "weight_decay", "momentum", "eps", "grad_clip", "min_delta"):
            if not getattr(self, name) >= 0:
                raise LmlabError(f"must be a non-negative number, got {getattr(self, name)!r}", name)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise LmlabError(f"must be in [0, 1), got {getattr(self, name)!r}", name)
        for name in ("decay_fraction", "dropout_until", "step_gamma"):
            if not 0 <= getattr(self, name) <= 1:
                raise LmlabError(f"must be in [0, 1], got {getattr(self, name)!r}", name)
        if not 0 <= self.muon_momentum < 1:
            raise LmlabError(f"must be in [0, 1), got {self.muon_momentum!r}", "muon_momentum")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval", "lbfgs_max_iter",
                     "lbfgs_history"):
            if getattr(self, name) < 1:
                raise LmlabError(f"must be a positive integer, got {getattr(self, name)!r}", name)
        for name in ("warmup_steps", "step_every", "max_steps", "max_tokens", "patience", "seed", "threads",
                     "pad_vocab", "eval_batch_size"):
            if getattr(self, name) < 0:
                raise LmlabError(f"must be a non-negative integer, got {getattr(self, name)!r}", name)
        if self.seed >= 2**63:  # torch.manual_seed takes 64 bits, and each rank seeds with seed + rank
            raise LmlabError(f"must be below 2**63, got {self.seed}", "seed")
        if self.max_steps == 0 and self.max_tokens == 0:
            raise LmlabError("set max_steps or max_tokens (or both): training needs an end")
        if self.dtype not in ("float32", "bfloat16"):
            raise unknown("training dtype", self.dtype, ("float32", "bfloat16"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_keys(d, cls)
        return cls(**d)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a JSON or TOML (`.toml`) file: one flat table of ModelConfig and TrainConfig keys.

    Keys are checked here (an unknown one gets the nearest name); values are checked by the dataclasses."""
    path = Path(path)
    if path.suffix != ".toml":
        values = read_json(path, "config file")
    else:
        loads = _toml_loads(path)
        try:
            values = loads(read_text(path, "config file"))
        except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError (read_text's LmlabError too)
            if isinstance(e, LmlabError):
                raise
            raise LmlabError(f"config file {path} is malformed ({e})") from None
    check_keys(values, ModelConfig, TrainConfig)
    return values


def _toml_loads(path: Path):
    """tomllib.loads (Python 3.11+), or the same function from tomli on 3.10, or a clear refusal."""
    try:
        import tomllib

        return tomllib.loads
    except ImportError:
        pass
    try:
        import tomli

        return tomli.loads
    except ImportError:
        raise LmlabError(f"config file {path}: reading TOML on Python < 3.11 needs the tomli package "
                         f"(pip install tomli), or write the settings as JSON") from None


def train_configs(preset: str | None = None, config_file: str | os.PathLike | None = None,
                  overrides: dict[str, Any] | None = None, saved: dict[str, Any] | None = None,
                  ) -> tuple[ModelConfig, TrainConfig]:
    """The settings of a training run as (ModelConfig, TrainConfig), each validated once.

    Precedence, lowest first: the named `preset` (or the `family`'s defaults), then the keys of `config_file`,
    then `overrides` (the CLI's flags). `saved` is a run's own lmlab.json (`{"config": ..., "train_config": ...}`,
    from `lmlab.checkpoint.saved_settings(run_dir)`): given with neither a preset nor a config file, it is the base
    instead, so resuming with only `max_steps` changed extends the run exactly as it was set up."""
    values = dict(read_config_file(config_file)) if config_file is not None else {}
    overrides = dict(overrides or {})
    check_keys(overrides, ModelConfig, TrainConfig)
    values.update(overrides)
    model_keys = {f.name for f in fields(ModelConfig)}
    base_train: dict[str, Any] = {}
    if saved is not None and preset is None and config_file is None:
        base = ModelConfig.from_dict(saved["config"])
        base_train = dict(saved.get("train_config") or {})
    elif preset is not None:
        base = globals()["preset"](preset)  # the function, whose name the argument hides
    else:
        base = ModelConfig(family=values.get("family", "gpt2"))
    mc = base.replace(**{k: v for k, v in values.items() if k in model_keys})
    tc = TrainConfig.from_dict({**base_train, **{k: v for k, v in values.items() if k not in model_keys}})
    return mc, tc


# LoRA targets by family, in our names: q/k/v are slices of the fused attn.qkv (HF q_proj/k_proj/v_proj), qkv the
# whole of it (GPT-2's c_attn), o attn.proj, gate/up/down the MLP's. "all-linear" takes every one of a family's.
LORA_TARGETS = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "gpt2": ("qkv", "o", "up", "down")}
LORA_DEFAULT_TARGETS = {"llama": ("q", "v"), "gpt2": ("qkv",)}  # PEFT's defaults: q_proj/v_proj, c_attn


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, "LoRA"): W x + (alpha / r) B A dropout(x) on each target layer, A (r, in)
    and B (out, r), B = 0 at the start. `targets` empty means the family's default (LORA_DEFAULT_TARGETS); names are
    checked against the model when the adapters are applied (lmlab.lora), where the family is known.
    `rslora` scales by alpha / sqrt(r) instead (Kalajdzievski 2023), as PEFT's use_rslora does."""

    r: int = knob(8, "LoRA rank")
    alpha: float = knob(16.0, "LoRA alpha; the update is scaled alpha/r")
    dropout: float = knob(0.0, "dropout on LoRA's input")
    targets: tuple[str, ...] = knob((), "comma-separated: q,k,v,o,gate,up,down (Llama; HF's q_proj... too), "
                                        "qkv,o,up,down (GPT-2), or all-linear (empty: q,v for Llama, qkv for GPT-2)")
    rslora: bool = knob(False, "scale by alpha/sqrt(r) (rank-stabilized LoRA), as PEFT's use_rslora")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LmlabError(f"must be a positive integer (the LoRA rank), got {self.r!r}; 8 is usual", "r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise LmlabError(f"must be a positive number (the LoRA alpha), got {self.alpha!r}; 16 is usual", "alpha")
        object.__setattr__(self, "alpha", float(self.alpha))
        check_rate("dropout", self.dropout)
        if isinstance(self.targets, str) or not all(isinstance(t, str) and t for t in self.targets):
            raise LmlabError(f"must be a list of module names, got {self.targets!r}", "targets")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        check_keys(d, cls)
        return cls(**{**d, "targets": tuple(d.get("targets", ()))})


DROPOUT_FIELDS = ("dropout", "dropout_embed", "dropout_attn", "dropout_resid")  # what a fine-tune may change
TEMPLATES = ("auto", "plain")


@dataclass(frozen=True)
class SFTConfig:
    """How instruction data becomes training examples (lmlab.training.sft): the held-out fraction, whether the prompt's
    tokens count in the loss (off by default: the model learns to answer, not to ask), the longest example, and
    the format: the model's own chat template ("auto", plain User:/Assistant: where it has none) or "plain"."""

    val_fraction: float = knob(0.1, "records held out for validation")
    train_on_prompt: bool = knob(False, "count the prompt's tokens in the loss too")
    max_length: int = knob(0, f"tokens per example at most (0: the model's context, at most {MAX_DEFAULT_CONTEXT})")
    template: str = knob("auto", "auto (the model's chat template, plain where it has none) or plain "
                                 "(User:/Assistant:)")

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.val_fraction < 1:
            raise LmlabError(f"must be in (0, 1), got {self.val_fraction!r}", "val_fraction")
        if self.max_length < 0:
            raise LmlabError(f"must be a non-negative integer, got {self.max_length!r}", "max_length")
        if self.template not in TEMPLATES:
            raise unknown("template", self.template, TEMPLATES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fine-tuning's own defaults over TrainConfig's pretraining ones: a short run from good weights, no decay of the
# weights being adapted, evaluation often enough to see it. Full fine-tuning moves every weight, so a 10x lower lr.
FINETUNE_DEFAULTS = dict(lr=1e-4, weight_decay=0.0, warmup_steps=10, max_steps=200, eval_interval=50, eval_batches=8,
                         batch_size=8, log_interval=5)
LORA_LR = 1e-3  # fine-tuning's lr with LoRA: only the small adapters move


TOKENIZERS = ("char", "bpe")


@dataclass(frozen=True)
class PrepareConfig:
    """How `lmlab prepare` tokenizes text into a data directory (lmlab.data.tokens.prepare)."""

    tokenizer: str = knob("char", "char or bpe (byte-level BPE)")
    vocab_size: int = knob(4096, "BPE vocabulary size")
    val_fraction: float = knob(0.1, "the last fraction of the token stream, kept for validation")

    def __post_init__(self) -> None:
        check_types(self)
        if self.tokenizer not in TOKENIZERS:
            raise unknown("tokenizer", self.tokenizer, TOKENIZERS)
        if not 0 < self.val_fraction < 1:
            raise LmlabError(f"must be in (0, 1), got {self.val_fraction}", "val_fraction")


@dataclass(frozen=True)
class EvalConfig:
    """How `lmlab eval` scores a model by the strided sliding window (lmlab.infer.evaluate): windows of `context`
    tokens every `stride` tokens, `batch_size` windows a call, the head and loss over `chunk` positions at a time."""

    batch_size: int = knob(8, "windows per batch")
    max_batches: int = knob(0, "stop after this many batches (0 = all)")
    context: int = knob(0, f"window length in tokens (0: the model's context, at most {MAX_DEFAULT_CONTEXT})")
    stride: int = knob(0, "tokens between window starts (0: half the window; = context: no overlap)")
    chunk: int = knob(1024, "positions per head + loss call: peak memory holds chunk x vocab fp32 logits "
                            "(0 = the whole batch at once)")

    def __post_init__(self) -> None:
        for name, least in (("batch_size", 1), ("max_batches", 0), ("context", 0), ("stride", 0), ("chunk", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LmlabError(f"must be an integer of at least {least}, got {value!r}", name)


# ---------------------------------------------------------------------------------------------------------
# Inference: sampling, chat's variant of it, and the server.

@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token, and when to stop. Validated once; errors name the parameter.

    The one home of the sampling defaults: `LM.generate`, `LM.stream` and the `lmlab generate` flags all start
    from these. temperature 0.8 is nanoGPT's sample.py default (the model's distribution, slightly sharpened, so
    small models garble fewer words); the truncation filters are off, as in HF's GenerationConfig. Chat starts
    from its own documented variant, `CHAT_SAMPLING` below."""

    max_new_tokens: int = knob(256, "tokens to generate at most")
    temperature: float = knob(0.8, "0 = greedy; <1 sharper, >1 flatter")
    top_k: int = knob(0, "keep the k most likely tokens (0 = off)")
    top_p: float = knob(1.0, "nucleus: keep the smallest set with mass p (1 = off)")
    min_p: float = knob(0.0, "drop tokens below p x the top probability (0 = off)")
    repetition_penalty: float = knob(1.0, "CTRL-style penalty on seen tokens (1 = off; Keskar et al. 2019)")
    seed: int | None = knob(None, "random seed: the same seed gives the same text")
    stop: tuple[str, ...] = knob(help="stop at this string (repeatable)", repeat=True, default_factory=tuple)
    truncate: bool = knob(False, "cut a prompt longer than the context from the left instead of refusing it")

    def __post_init__(self) -> None:
        def number(name: str, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise LmlabError(f"must be a number, got {value!r}", name)

        number("max_new_tokens", self.max_new_tokens, int)
        if self.max_new_tokens < 0:
            raise LmlabError(f"must be >= 0, got {self.max_new_tokens}", "max_new_tokens")
        number("temperature", self.temperature)
        if not self.temperature >= 0:
            raise LmlabError(f"must be >= 0 (0 means greedy), got {self.temperature}", "temperature")
        number("top_k", self.top_k, int)
        if self.top_k < 0:
            raise LmlabError(f"must be >= 0 (0 turns it off), got {self.top_k}", "top_k")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise LmlabError(f"must be in (0, 1] (1 turns it off), got {self.top_p}", "top_p")
        number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise LmlabError(f"must be in [0, 1] (0 turns it off), got {self.min_p}", "min_p")
        number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise LmlabError(f"must be > 0 (1 turns it off), got {self.repetition_penalty}", "repetition_penalty")
        if self.seed is not None:
            number("seed", self.seed, int)
            if not 0 <= self.seed < 2**63:
                raise LmlabError(f"must be in [0, 2**63), got {self.seed}", "seed")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise LmlabError(f"must be a string or a list of strings, got {self.stop!r}", "stop")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))

    def replace(self, **settings) -> SamplingConfig:
        """These settings with some changed (validated again); an unknown name is an error naming the nearest."""
        names = [f.name for f in fields(self)]
        for name in settings:
            if name not in names:
                raise LmlabError(f"unknown sampling setting {name!r}{closest(name, names)}; "
                                 f"known: {', '.join(names)}")
        return replace(self, **settings)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Chat's own sampling defaults, over SamplingConfig's: instruct models answer better colder (SmolLM2's model card
# suggests temperature 0.2 and top_p 0.9), and an answer often runs past generate's 256 tokens.
CHAT_SAMPLING = SamplingConfig(temperature=0.3, top_p=0.9, max_new_tokens=512)


# Where a server listens and what guards it: `lmlab serve` and `lmlab lab` alike (one knob each, checked once).
HOST = dict(default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
PORT = dict(default=8000, help="TCP port")


def check_listen(cfg: Any) -> None:
    """A server config's host, port and api_key."""
    if isinstance(cfg.port, bool) or not isinstance(cfg.port, int) or not 0 <= cfg.port <= 65535:
        raise LmlabError(f"must be an integer in [0, 65535], got {cfg.port!r}", "port")
    if not isinstance(cfg.host, str) or not cfg.host.strip():
        raise LmlabError(f"must be an address such as 127.0.0.1 or 0.0.0.0, got {cfg.host!r}", "host")
    if cfg.api_key is not None and (not cfg.api_key or not cfg.api_key.isprintable() or " " in cfg.api_key):
        raise LmlabError("must be a non-empty printable string without spaces", "api_key")


@dataclass(frozen=True)
class ServeConfig:
    """The server's knobs, validated once. `context` is the window a reply decodes in (`window`): the model's
    context, or less where `context` (0: SERVE_MAX_DEFAULT_CONTEXT) is smaller, since the cache holds max_batch x
    window tokens of keys and values. A reply that fills its window slides it as everywhere in lmlab, so replies
    longer than a window smaller than the model's context differ from `lmlab generate`'s past it."""

    host: str = knob(**HOST)
    port: int = knob(**PORT)
    max_batch: int = knob(8, "requests decoded together at most")
    max_queue: int = knob(64, "requests waiting for a row at most; more get HTTP 503 with Retry-After")
    context: int = knob(0, "the window a request decodes in, prompt and reply (0: the model's context, at most "
                           f"{SERVE_MAX_DEFAULT_CONTEXT}); below the model's context it saves memory, but a reply "
                           "that fills it slides there, sooner than lmlab generate's")
    prefill_chunk: int = knob(256, "prompt tokens prefilled between two decoding steps at most")
    api_key: str | None = knob(None, "require the header Authorization: Bearer KEY on every route but /health and /")
    request_timeout: float = knob(0.0, "seconds a request may take in all, queue included; past it the request "
                                       "ends with an error and its row is freed (0: no limit)")

    def __post_init__(self) -> None:
        check_listen(self)
        for name, low, high in (("max_batch", 1, 1024), ("max_queue", 0, 1_000_000), ("context", 0, 1 << 24),
                                ("prefill_chunk", 1, 1 << 20)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise LmlabError(f"must be an integer in [{low}, {high}], got {value!r}", name)
        if isinstance(self.request_timeout, bool) or not isinstance(self.request_timeout, (int, float)) or \
                not 0 <= self.request_timeout < float("inf"):
            raise LmlabError(f"must be a number of seconds >= 0 (0: no limit), got {self.request_timeout!r}",
                             "request_timeout")

    def window(self, model_context: int) -> int:
        """The tokens a request decodes in: the model's context, or `context` (its default) where smaller."""
        return min(model_context, self.context or SERVE_MAX_DEFAULT_CONTEXT)


@dataclass(frozen=True)
class LabConfig:
    """`lmlab lab`'s knobs: where it listens (as `lmlab serve` does) and which folders it shows. Paths are checked
    where they are read (lmlab.serve.lab), since a config says what, not whether it exists yet."""

    host: str = knob(**HOST)
    port: int = knob(**PORT)
    api_key: str | None = knob(None, "require the header Authorization: Bearer KEY on every route but /health and "
                                     "the page itself (which asks for the key)")
    runs: str = knob("runs", "the folder of run directories to show (pretraining, fine-tuning, studies' runs), "
                             "searched a few levels down")
    studies: str | None = knob(None, "a folder of study reports (report.md and its PNGs) to show besides the ones "
                                     "under --runs; none: docs/studies of the lmlab source tree, where there is one")
    max_models: int = knob(2, "models the page keeps loaded at most; loading one more unloads the one used least "
                              "recently")

    def __post_init__(self) -> None:
        check_types(self)
        check_listen(self)
        if not self.runs.strip():
            raise LmlabError("must name a folder, got an empty string", "runs")
        if not 1 <= self.max_models <= 64:
            raise LmlabError(f"must be in [1, 64], got {self.max_models}", "max_models")
