"""The README's end-to-end demo: build a tiny model, save it as a checkpoint, load it back, generate.

It grows with the project; for now the model is untrained (random weights), so its text is noise: the
point is that every stage of the pipeline runs: tokenizer, model, checkpoint, load, KV-cached decoding.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
"""


def run_demo(out: str | Path) -> None:
    import lmlab
    from lmlab.checkpoint import save_model
    from lmlab.config import preset
    from lmlab.model import Transformer
    from lmlab.tokenizer import CharTokenizer

    t0 = time.time()
    torch.manual_seed(0)
    tok = CharTokenizer.train([TEXT])
    cfg = preset("char-cpu").replace(vocab_size=tok.vocab_size)
    model = Transformer(cfg)
    print(f"[1/3] built a {cfg.family} model from preset char-cpu: {model.num_params():,} parameters, "
          f"{tok.vocab_size}-character vocabulary")
    path = save_model(out, model, tok)
    print(f"[2/3] saved the checkpoint to {path}/ (model.safetensors, lmlab.json, tokenizer.json)")
    lm = lmlab.load(path, device="cpu")
    prompt = "Shall I"
    greedy = lm.generate(prompt, max_new_tokens=40, temperature=0)
    sampled = lm.generate(prompt, max_new_tokens=40, temperature=1.0, top_k=10, seed=1)
    print("[3/3] generated with the KV cache (untrained weights, so expect noise):")
    print(f"  greedy:          {prompt!r} -> {greedy!r}")
    print(f"  top-k 10, seed 1: {prompt!r} -> {sampled!r}")
    print(f"done in {time.time() - t0:.1f}s. Try: lmlab generate --model {path} --prompt 'Shall I' --stream")
