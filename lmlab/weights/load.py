"""The last step every loader shares (our checkpoints, HF directories, GGUF files): a model built on the meta
device receives its complete state dict, and what is derived from the weights is rebuilt.

Loaders convert each tensor to its final dtype and device before reading the next (gpt-fast's habit: build on
meta, load with assign=True), so the state handed here is already the model: assigning it copies nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lmlab.errors import LmlabError
from lmlab.utils import trim_heap


def finish_load(model, state: dict[str, torch.Tensor]) -> None:
    """Assign a complete state dict to a model built on the meta device, re-tie a tied head, rebuild rope."""
    if model.cfg.tie_embeddings:
        state = dict(state, **{"lm_head.weight": state["wte.weight"]})
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.init_rope()


def load_converted(model, pairs: Iterable[tuple[str, torch.Tensor]], device: torch.device, dtype: torch.dtype,
                   source: str, origin: str) -> None:
    """Fill a meta-device model from (our key, tensor) pairs, converting each to `dtype` on `device` before the
    next is read: peak memory is the finished model plus one source tensor, never two copies of the model.
    `origin` names what set the expected shapes (config.json, the GGUF metadata) for the mismatch error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for key, t in pairs:
        if tuple(t.shape) != expected[key]:
            raise LmlabError(f"{source}: tensor for {key} has shape {tuple(t.shape)} but {origin} implies "
                             f"{expected[key]}; {origin} and the weights do not match")
        state[key] = t.to(device=device, dtype=dtype)
        del t  # the source tensor goes before the next is read
        trim_heap()  # and the temporaries freed in the heap with it (q, k, v before fusing)
    finish_load(model, state)
    model.eval()
