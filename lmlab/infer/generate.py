"""Generation as callers use it: token ids in, token ids out (`generate_ids`), or text in, text out
(`stream_text`, `generate_text`), each running lmlab.infer.engine's one engine to completion.

This module is also `lmlab.generate`'s home: the sampling settings (lmlab.config.SamplingConfig), the pure filters
(lmlab.infer.sampling), the text layer (lmlab.infer.text) and `compile_decoding` are importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

from lmlab.config import SamplingConfig
from lmlab.errors import LmlabError
from lmlab.infer.engine import Request, compile_decoding, engine_for
from lmlab.infer.sampling import (  # noqa: F401 - lmlab.generate's names
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    select,
)
from lmlab.infer.text import TextStream
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

__all__ = ["SamplingConfig", "TextStream", "compile_decoding", "fit_prompts", "generate_ids", "generate_text",
           "select", "stream_text"]


def fit_prompts(prompts: list[list[int]], s: SamplingConfig, context_length: int) -> list[list[int]]:
    """Check prompt lengths against the context; cut from the left only when `s.truncate` asks for it."""
    if not prompts:
        raise LmlabError("no prompts given: pass a prompt string, or a non-empty list of them")
    out = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise LmlabError(f"prompt {i} is empty (0 tokens) and this tokenizer adds no BOS; give some text")
        if len(ids) > context_length:
            if not s.truncate:
                raise LmlabError(f"prompt has {len(ids)} tokens but the model's context is {context_length}; "
                                 "shorten it or allow truncation (truncate=True, --truncate)")
            keep = context_length - min(s.max_new_tokens, context_length // 2)
            ids = ids[-keep:]
        out.append(list(ids))
    return out


def _eos(eos_id: int | Collection[int] | None) -> frozenset[int]:
    return frozenset() if eos_id is None else frozenset({eos_id} if isinstance(eos_id, int) else eos_id)


def _row_settings(s: SamplingConfig, b: int) -> SamplingConfig:
    """Row b of a batch draws with seed + b, as the server's n choices of one request do: rows of the same prompt
    differ, and row 0 draws what the prompt would draw alone."""
    return s if s.seed is None or b == 0 else s.replace(seed=(s.seed + b) % 2**63)


def _run(model: Transformer, tokenizer: Tokenizer | None, reqs: list[Request]) -> Iterator[list]:
    """Step an engine sized for `reqs` (every prompt admitted in the first step) until all are done; yields each
    step's events. The model runs in eval mode meanwhile, and keeps the engine afterwards (`Engine.park`): the next
    call's prompt is prefilled from where it parts from this one's."""
    C = model.cfg.context_length
    slots = min(C, max(len(r.prompt) for r in reqs) + max(r.s.max_new_tokens for r in reqs))
    engine = engine_for(model, tokenizer, len(reqs), slots)
    was_training = model.training
    model.eval()
    try:
        for req in reqs:
            engine.add(req)
        while not engine.idle:
            try:
                events = engine.step()
            except BaseException:
                engine.abort()  # a step cut short (Ctrl-C, an error) may have half-written the prompt cache
                raise
            yield events
    finally:
        for req in reqs:
            req.cancelled = True
        if not engine.idle:
            engine.step()  # retire what an early exit between steps left behind, so the kept engine starts clean
        engine.park()
        model.train(was_training)


def generate_ids(model: Transformer, prompts: list[list[int]], s: SamplingConfig,
                 eos_id: int | Collection[int] | None = None,
                 tokenizer: Tokenizer | None = None) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token (None for rows already finished).

    `eos_id` is one id or several (an instruct model's generation_config.json may list end-of-text and
    end-of-turn ids): a row ends at the first of them it produces, as HF generate does. Stop strings (`s.stop`)
    need the `tokenizer`. Each prompt is its own request of the engine, drawing with its own generator: with a
    seed, row b's is seeded with seed + b (`_row_settings`). The first yield follows the prefill, each later one
    a decoding step (lmlab bench times them so)."""
    prompts = fit_prompts(prompts, s, model.cfg.context_length)
    if s.max_new_tokens == 0:
        return
    reqs = [Request(p, _row_settings(s, b), eos=_eos(eos_id)) for b, p in enumerate(prompts)]
    row_of = {id(r): b for b, r in enumerate(reqs)}
    for events in _run(model, tokenizer, reqs):
        step: list[int | None] = [None] * len(reqs)
        for req, _, token, _ in events:
            step[row_of[id(req)]] = token
        yield step


def stream_text(model: Transformer, tokenizer: Tokenizer, prompts: list[str] | list[list[int]], s: SamplingConfig,
                eos_id: int | Collection[int] | None = None, trim_start: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) as tokens arrive. EOS tokens (all of the tokenizer's, unless `eos_id` says
    otherwise) and stop strings are not part of the text; with `trim_start` (a chat reply) neither is the
    leading whitespace. Prompts are strings, or token id lists already encoded (a chat template's output, say)."""
    eos = _eos(tokenizer.eos_ids if eos_id is None else eos_id)
    ids = fit_prompts([p if isinstance(p, list) else tokenizer.encode(p) for p in prompts], s,
                      model.cfg.context_length)
    if s.max_new_tokens == 0:
        return
    out: list[tuple[int, str]] = []
    reqs = []
    for b, p in enumerate(ids):
        reqs.append(Request(p, _row_settings(s, b), emit=lambda piece, b=b: out.append((b, piece.text))
                            if piece.text else None, eos=eos, trim_start=trim_start))
    for _ in _run(model, tokenizer, reqs):
        yield from out
        out.clear()


def generate_text(model: Transformer, tokenizer: Tokenizer, prompts: list[str] | list[list[int]], s: SamplingConfig,
                  on_text: Callable[[int, str], None] | None = None, trim_start: bool = False) -> list[str]:
    """Each prompt's continuation. `on_text(row, delta)` is called as text arrives (streaming)."""
    out = [""] * len(prompts)
    for row, delta in stream_text(model, tokenizer, prompts, s, trim_start=trim_start):
        out[row] += delta
        if on_text is not None:
            on_text(row, delta)
    return out
