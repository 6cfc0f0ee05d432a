"""The only module that knows torch.distributed: torchrun's environment, DDP/FSDP2 wrapping, rank-0 output.

Model code stays single-device (torchtitan's rule); parallelism is applied here, from outside, in one place.
Under `torchrun --nproc_per_node=N -m lmlab train ...` each process reads RANK/WORLD_SIZE/LOCAL_RANK, joins
a process group (NCCL on CUDA, gloo on CPU), and trains on its own slice of each global batch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmlab.utils import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by it; otherwise a single process on `device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def wrap(model: torch.nn.Module, info: DistInfo, fsdp: bool) -> torch.nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (each block's weights sharded)."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def full_state_dict(model: torch.nn.Module, info: DistInfo, fsdp: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from every rank under FSDP; a collective call then)."""
    if info.enabled and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def optimizer_state(model: torch.nn.Module, opt, info: DistInfo, fsdp: bool) -> dict:
    """The optimizer state for a checkpoint; under FSDP gathered whole (keyed by parameter name), collectively."""
    if info.enabled and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(model, opt.optimizers[0],
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"optimizers": [full]}
    return opt.state_dict()


def load_optimizer_state(model: torch.nn.Module, opt, state: dict, info: DistInfo, fsdp: bool) -> None:
    if info.enabled and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt.optimizers[0], optim_state_dict=state["optimizers"][0],
                                 options=StateDictOptions(full_state_dict=True))
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
        return
    opt.load_state_dict(state)


def mean_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise mean of `t` over every rank, on the device: a collective but no host sync, so the training
    loop can average a whole log interval's losses in one call."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision (stop now?) for every rank, so all leave the loop at the same step."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (a collective: all ranks call it)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def leave_worker() -> None:
    """Under torchrun, end a worker whose run is saved and whose process group is gone without the interpreter's
    teardown: on a loaded machine gloo's threads can die in C++ static destructors there and abort (SIGABRT,
    "terminate called without an active exception") after all the work is done. A no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def print0(info: DistInfo, *args, **kwargs) -> None:
    if info.is_main:
        print(*args, **kwargs)
