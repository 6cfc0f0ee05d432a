"""The last step every loader shares (our checkpoints, HF directories, GGUF files): a model built on the meta
device receives its complete state dict, and what is derived from the weights is rebuilt.

Loaders convert each tensor to its final dtype and device before reading the next (gpt-fast's habit: build on
meta, load with assign=True), so the state handed here is already the model: assigning it copies nothing.
"""

from __future__ import annotations

import torch


def finish_load(model, state: dict[str, torch.Tensor]) -> None:
    """Assign a complete state dict to a model built on the meta device, re-tie a tied head, rebuild rope."""
    if model.cfg.tie_embeddings:
        state = dict(state, **{"lm_head.weight": state["wte.weight"]})
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.init_rope()
