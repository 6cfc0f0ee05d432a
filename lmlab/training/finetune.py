"""Supervised fine-tuning, full or through LoRA adapters, by the pretraining loop (lmlab.training.loop) itself.

`FineTune` is a `lmlab.training.loop.Pretrain` job with three differences: its data are instruction examples
(lmlab.training.sft.SFTData: chat-template rendering, the prompt masked out of the loss, a held-out fraction); its model
starts from any source `lmlab.load` reads (dequantized to float32), with LoRA layers applied (lmlab.lora) when
asked; and a LoRA run's checkpoints hold only the adapter (`adapter.safetensors`, with the base named in
lmlab.json), so `lmlab.load(RUN)` rebuilds the base and applies it. Everything else is the pretraining loop's:
optimizers, schedules, dropout, early stopping, metrics.jsonl, the progress bar, torchrun, and exact resume after
a kill (the base is re-read, the adapter or weights and the optimizer state come from RUN/last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.config import DROPOUT_FIELDS, FINETUNE_DEFAULTS, LORA_LR, LoRAConfig, ModelConfig, SFTConfig, TrainConfig
from lmlab.errors import LmlabError
from lmlab.lora import apply_lora, is_adapter_key, load_adapter_state
from lmlab.model import Transformer
from lmlab.training.distributed import DistInfo
from lmlab.training.loop import Pretrain, TrainResult, train_job
from lmlab.training.sft import SFTData, read_conversations
from lmlab.utils import current_dir

ADAPTER_FILE = "adapter.safetensors"


def finetune_config(flags: dict[str, Any], lora: bool, saved: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of a fine-tune: FINETUNE_DEFAULTS (lr LORA_LR with LoRA), then a resumed run's own
    settings, then the flags given."""
    base = {**FINETUNE_DEFAULTS, "lr": LORA_LR if lora else FINETUNE_DEFAULTS["lr"]}
    return TrainConfig.from_dict({**base, **((saved or {}).get("train_config") or {}), **flags})


def lora_config(enabled: bool, **given: Any) -> LoRAConfig | None:
    """The LoRA settings of a fine-tune: None without LoRA (where a LoRA setting is an error naming its flag),
    else LoRAConfig's defaults with the settings given (None: not given; `targets` may be a comma-separated
    string)."""
    given = {k: v for k, v in given.items() if v is not None}
    if not enabled:
        if given:
            raise LmlabError(f"--lora-{next(iter(given)).replace('_', '-')} sets up LoRA; add --lora (or drop it for "
                             "full fine-tuning)")
        return None
    if isinstance(given.get("targets"), str):
        given["targets"] = tuple(t.strip() for t in given["targets"].split(",") if t.strip())
    return LoRAConfig(**given)


def base_name(source: str | Path) -> str:
    """How a checkpoint names its base: an absolute path, or a model name as given."""
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


class FineTune(Pretrain):
    """A fine-tuning run's data, starting weights and checkpoint contents (module docstring)."""

    def __init__(self, source: str | Path, data_file: str | Path, sft: SFTConfig, lora: LoRAConfig | None) -> None:
        from lmlab.api import load

        if not Path(data_file).is_file():
            raise LmlabError(f"instruction data {data_file} not found: give a JSON or JSONL file of records")
        read_conversations(data_file)  # a malformed record is reported now, not after a long load of the base
        self.source, self.data_file, self.sft, self.lora = base_name(source), Path(data_file), sft, lora
        self.base = load(source, device="cpu", dtype="float32", quantize="off")
        if self.base.tokenizer is None:
            raise LmlabError(f"{source} has no tokenizer, so it cannot read instruction data; add its tokenizer.json")
        self.targets: list[str] = []

    def settings(self) -> dict[str, Any]:
        """What must not change when the run is resumed (lmlab.json's "finetune")."""
        return {"base": self.source, "data_file": str(self.data_file.resolve()), "sft": self.sft.to_dict(),
                "lora": self.lora.to_dict() if self.lora else None}

    def load_data(self, mc: ModelConfig, tc: TrainConfig, info: DistInfo) -> SFTData:
        return SFTData(self.data_file, self.base.tokenizer, self.sft, mc.vocab_size, mc.context_length,
                       tc.batch_size, tc.grad_accum, tc.seed, tc.sampling, info.rank, info.world, tc.eval_batches,
                       tc.eval_batch_size)

    def model_config(self, mc: ModelConfig, data: SFTData) -> ModelConfig:
        return mc  # the base's, with the dropout given for fine-tuning

    def check_resume(self, meta: dict, mc: ModelConfig, tc: TrainConfig, data: SFTData, info: DistInfo) -> None:
        super().check_resume(meta, mc, tc, data, info)
        saved, now = meta.get("finetune") or {}, self.settings()
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            raise LmlabError(f"cannot resume: the {', '.join(diff)} differ from the saved run "
                             f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); pass the original run's "
                             "--model, --data and fine-tuning flags, or fine-tune into a new --out")

    def build_model(self, mc: ModelConfig, tc: TrainConfig, info: DistInfo, last_dir: Path | None) -> Transformer:
        """The base's weights (LoRA layers on top, seeded), or what RUN/last holds; only what trains needs grad."""
        torch.manual_seed(tc.seed)
        model = self.base.model
        model.cfg = mc
        model.to(info.device)
        if self.lora is not None:
            self.targets = apply_lora(model, self.lora)
        else:
            model.requires_grad_(True)
        if last_dir is not None:
            self.restore(model, current_dir(last_dir), info.device)
        torch.manual_seed(tc.seed + info.rank)  # a dropout stream per rank (a resume restores it)
        return model

    def restore(self, model: Transformer, last_dir: Path, device: torch.device) -> None:
        """RUN/last's weights into the model built from the base: every weight (full fine-tuning; the file's
        tensors copied in, no second model built) or the adapters."""
        from safetensors.torch import load_file

        if self.lora is None:
            state = load_file(str(last_dir / "model.safetensors"), device=str(device))
            if model.cfg.tie_embeddings:  # stored once
                state["lm_head.weight"] = state["wte.weight"]
            with torch.no_grad():
                model.load_state_dict(state)
            return
        load_adapter_state(model, load_file(str(last_dir / ADAPTER_FILE), device=str(device)), str(last_dir))

    def checkpoint(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict, str]:
        extra = {"finetune": self.settings()}
        if self.lora is None:
            return weights, extra, "model.safetensors"
        adapter = {"base": self.source, **self.lora.to_dict(), "targets": self.targets}
        return {k: v for k, v in weights.items() if is_adapter_key(k)}, {**extra, "adapter": adapter}, ADAPTER_FILE


def finetune(source: str | Path, data_file: str | Path, run_dir: str | Path, tc: TrainConfig | None = None,
             sft: SFTConfig | None = None, lora: LoRAConfig | None = None, dropout: dict[str, float] | None = None,
             resume: bool = False, quiet: bool = False) -> TrainResult:
    """Fine-tune the model `source` on the instruction records of `data_file` into `run_dir`: every weight, or
    only LoRA adapters when `lora` is given. `dropout` sets ModelConfig's dropout fields for the run (the base's
    own rates otherwise; a resumed run's own unless given). tc None: fine-tuning's defaults, or a resumed run's own
    settings (finetune_config)."""
    from lmlab.checkpoint import saved_settings

    saved = saved_settings(run_dir) if resume else None
    tc = tc or finetune_config({}, lora is not None, saved)
    if saved is not None:
        dropout = {**{k: saved["config"][k] for k in DROPOUT_FIELDS}, **(dropout or {})}
    job = FineTune(source, data_file, sft or SFTConfig(), lora)
    mc = job.base.config.replace(**(dropout or {}))
    return train_job(job, mc, tc, run_dir, resume, quiet)
