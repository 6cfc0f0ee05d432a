"""The one inference engine: a batched static KV cache whose rows join and leave between decoding steps.

`lmlab generate`, `lmlab chat`, the Python API, the server, `lmlab bench` and the studies all decode here
(lmlab.infer.generate runs it to completion; lmlab.serve's scheduler is a thread and a queue around it), so every
speed-up and every fix reaches them all. The shape is nanochat's and vLLM's, over gpt-fast's static cache:

- The batch is one static KV cache of `max_batch` rows x S slots (`Transformer.make_cache`). Every busy row
  writes its next token into the same slot p (the write pointer); row r's tokens fill slots [offset[r], p), and
  positions count from offset[r] (the model's left-padding API), so rows of different lengths share a step.
- `step()` first decodes one token for every busy row, then prefills waiting prompts into a one-row staging
  cache, at most `step_prefill` tokens per step (Orca's iteration-level scheduling, Yu et al. OSDI 2022;
  Sarathi's chunked prefill, Agrawal et al. 2023) in model calls of at most `prefill_chunk` tokens, so a long
  prompt delays the running rows by one chunk per step, never by its whole prefill. The staging cache keeps the
  last prompt's keys and values, and a prompt that begins like it is prefilled from where they part (llama.cpp
  server's prompt cache).
- A prefilled prompt is copied into free rows ending at slot p (the rows' content moved right first when p is
  smaller than the prompt), one row per choice (`n`), and each samples its first token from the prefill.
- Finished or cancelled rows retire at once, the last busy row moving into the hole, so busy rows are always
  rows [0, n); in eager code a step runs over them alone.
- When p reaches the end of the cache every row moves left. **A row that fills the whole cache slides its
  window**: its last S/2 tokens are prefilled again into its row (positions restarting at 0) and decoding goes
  on, the context shrinking to S/2 and growing back, one re-run of S/2 tokens every S/2 tokens (unlike nanoGPT's
  sample loop, which re-runs the whole context for every token). This is the one behaviour at the context's end,
  for every caller: a reply ends only at EOS, a stop string or max_new_tokens, so a finish_reason of "length"
  always means max_new_tokens (the API's max_tokens) was reached.

Sampling is lmlab.infer.sampling's `select`, per row with the row's own SamplingConfig and its own
torch.Generator (seed + choice index), so a seeded request draws the same tokens alone or beside others; greedy
rows without penalties take one batched argmax. OpenAI's presence/frequency penalties and logit_bias (`Extras`)
apply to the logits first. Each step reads its tokens to the host once.

A model given to `compile_decoding` decodes through torch.compile: the step then always runs all max_batch rows
and all S slots (idle rows attend to their own slot only), one static shape, captured as a CUDA graph on CUDA.

Every model keeps its last engine between calls (`engine_for`), so a call whose prompt begins like the previous
one's (a conversation's next turn) prefills only from where they part: a compiled model keeps the whole engine (a
CUDA graph replays at the addresses it was recorded with), an eager one only its staging row, the prompt cache
(`park`): one row of keys and values per model, and none once the weights change.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.config import SamplingConfig
from lmlab.errors import LmlabError
from lmlab.fuse import fuse_gate_up
from lmlab.infer.sampling import select
from lmlab.infer.text import TextStream
from lmlab.model import KVCache, Transformer
from lmlab.tokenizer import Tokenizer

DEFAULT_CHUNK = 512  # prompt tokens per model call in a prefill: bounds its attention scores' memory
SLOT_BUCKET = 256  # a compiled engine's cache length is a multiple of this: few shapes, few compilations


@dataclass(frozen=True)
class Extras:
    """OpenAI's logit processors, which SamplingConfig does not have: penalties on counts of generated tokens
    (logit - frequency * count - presence * [count > 0]) and a bias added to chosen token ids."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def counts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Piece:
    """What one choice produced since its last piece: text (stop strings and split characters held back),
    the tokens' (id, logprob, [(id, logprob) top alternatives]) when asked, and at the end why it stopped."""

    index: int
    text: str
    tokens: list[tuple[int, float, list[tuple[int, float]]]]
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    completion_tokens: int = 0  # on the last piece: tokens generated, EOS included


@dataclass(eq=False)
class Request:
    """One prompt and its n choices. `emit` hears each Piece (on the thread that steps the engine)."""

    prompt: list[int]
    s: SamplingConfig
    emit: Callable[[Piece], None] | None = None
    n: int = 1
    eos: frozenset[int] = frozenset()
    extras: Extras = Extras()
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely
    trim_start: bool = False  # a chat reply: leading whitespace is not part of its text
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    prefilled: int = 0  # prompt tokens in the staging cache
    cached: int = 0  # of those, how many were there already (a prefix shared with the previous prompt)
    first_token_at: float | None = None
    done: int = 0  # choices finished


@dataclass(eq=False)
class Row:
    """A choice being decoded: its sampling state and where its tokens sit in the cache."""

    req: Request
    index: int
    offset: int  # the cache slot of its first token
    gen: torch.Generator | None
    stream: TextStream | None
    seen: torch.Tensor | None  # (1, V) prompt and generated tokens, for the repetition penalty
    counts: torch.Tensor | None  # (1, V) generated tokens, for presence/frequency penalties
    history: list[int]  # prompt and sampled tokens; the last one is not in the cache yet
    generated: list[int] = field(default_factory=list)  # EOS excluded: the text's ids
    produced: int = 0  # tokens sampled, EOS included
    finish: str | None = None
    started: bool = False  # trim_start: some text has been handed out

    @property
    def batchable(self) -> bool:
        """Greedy with nothing per row: its token comes from one argmax over every such row."""
        r = self.req
        return r.s.greedy and r.s.repetition_penalty == 1.0 and not r.extras.counts and not r.extras.logit_bias \
            and r.logprobs is None


Event = tuple[Request, int, int, "str | None"]  # (request, choice index, token, finish reason or None)

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled decoding step
_GRAPHED: weakref.WeakSet = weakref.WeakSet()  # models whose step is a CUDA graph
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the engine it keeps between calls


def compile_decoding(model: Transformer, mode: str | None = None) -> None:
    """Run `model`'s one-token decoding steps through torch.compile from now on (prefills stay eager).

    A decoding step is dozens of small ops per layer, each paying PyTorch's dispatch (~3 us on a CPU core):
    about a third of a SmolLM2 step at batch 1. Inductor fuses the elementwise work into generated code and
    leaves the matmuls to their kernels. Compiling costs about a minute on a 2-core CPU for each new batch size
    and cache length (cache lengths are rounded up to a multiple of 256 to keep those few), so it pays for long
    generations and servers, not for one short reply.

    On CUDA (mode None there means "reduce-overhead") the step is also captured as a CUDA graph (gpt-fast's
    recipe): one replay launches the whole step. That needs the step as one graph (`fullgraph`: a graph break is
    an error, not a silent slowdown) and the cache at fixed addresses, so such a model keeps its engine. A float
    SwiGLU model's gate and up projections are fused first (lmlab.fuse; its state dict is unchanged)."""
    if mode is None and model.wte.weight.device.type == "cuda":
        mode = "reduce-overhead"
    graphs = mode == "reduce-overhead"
    fuse_gate_up(model)  # one GEMM for a SwiGLU's gate and up (lmlab.fuse): the same numbers, fewer kernels
    _COMPILED[model] = torch.compile(model, dynamic=False, mode=mode, fullgraph=graphs)
    if graphs:
        _GRAPHED.add(model)


def engine_for(model: Transformer, tokenizer: Tokenizer | None, max_batch: int, slots: int,
               prefill_chunk: int = DEFAULT_CHUNK) -> Engine:
    """An idle engine for one call, holding the model's prompt cache: the engine the model kept from its last call
    when it fits, else a new one that takes that engine's prompt cache over; give it back with `park`. A compiled
    model's engine fits only at its very shape, slots rounded up to a multiple of SLOT_BUCKET (static shapes; a
    CUDA graph replays at the addresses it was recorded with, and a new cache per call would make it record again,
    and give up after a few dozen); an eager one's also when it is longer (an eager step runs over the busy slots
    alone, and a row slides only at the model's context, so a longer cache decodes the same tokens)."""
    if model in _COMPILED:
        slots = min(model.cfg.context_length, -(-slots // SLOT_BUCKET) * SLOT_BUCKET)
    kept = _ENGINES.pop(model, None)  # one caller at a time owns it (the model's caches are one state anyway)
    if kept is not None and (not kept.idle or kept.weights != weights_stamp(model)):
        kept = None  # left mid-call, or the weights changed since (trained, moved, quantized): nothing of it fits
    if kept is not None and kept.compiled is _COMPILED.get(model) and kept.max_batch == max_batch and (
            kept.S == slots if kept.compiled is not None else kept.S >= slots):
        engine, engine.model = kept, model
        if not engine.main:  # parked eager engine: its batch cache was given back
            engine.main = model.make_cache(max_batch, engine.S)
    else:
        engine = Engine(model, tokenizer, max_batch, slots, prefill_chunk)
        if kept is not None:
            engine.take_prompt(kept)
    engine.tokenizer = tokenizer
    return engine


def forget_prompt(model: Transformer) -> None:
    """Void the prompt cache the model keeps, its engine staying (for a benchmark that times cold prefills)."""
    kept = _ENGINES.get(model)
    if kept is not None:
        kept.staged_ids = []


def weights_stamp(model: Transformer) -> tuple:
    """Which tensor each weight is, where it lives and its in-place version (KV caches aside): an optimizer step,
    load_state_dict, a move, quantizing or applying LoRA changes it, and with it the keys and values of any
    prompt."""
    return tuple(_stamp(t) for m in model.modules() if not isinstance(m, KVCache)
                 for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)


def _stamp(t: torch.Tensor) -> tuple:
    try:
        where = t.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own
        where = None
    return id(t), where, str(t.device), t.dtype, 0 if t.is_inference() else t._version


class Engine:
    """The batch and its cache; `add` requests, then `step` until `idle`. Not thread-safe: one thread steps it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 1, slots: int = 0,
                 prefill_chunk: int = DEFAULT_CHUNK, step_prefill: int | None = None) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.S = min(model.cfg.context_length, slots or model.cfg.context_length)
        self.prefill_chunk, self.step_prefill = prefill_chunk, step_prefill
        self.device = model.wte.weight.device
        self.compiled = _COMPILED.get(model)
        self.graphed = model in _GRAPHED
        self.main = model.make_cache(max_batch, self.S)
        self.staging = model.make_cache(1, self.S)
        self.waiting: deque[Request] = deque()
        self.rows: list[Row] = []
        self.staged: Request | None = None
        self.staged_ids: list[int] = []  # the tokens whose keys and values fill the staging cache's first slots
        self.p = 0  # the slot every busy row writes its next token to
        self.tokens = self.cached_tokens = 0  # counters: tokens sampled, prompt tokens not prefilled again
        self.events: list[Event] = []
        self._views: tuple[tuple[int, int], list[KVCache]] | None = None  # ((rows, first slot), their views)
        self.weights: tuple | None = None  # the weights' stamp when parked: its prompt cache is theirs

    def park(self) -> None:
        """The call is over: the model keeps this engine for its next call (`engine_for`). An eager engine gives
        its batch cache back (max_batch x S tokens: memory between calls is the one staging row, the prompt
        cache), the model its cache views, and lets go of the model (the registry holds models weakly: a model
        no longer used is freed with its engine); a compiled one keeps all, at the addresses its graph uses."""
        self.weights, self.events = weights_stamp(self.model), []
        _ENGINES[self.model] = self
        if self.compiled is None:
            self.model.clear_cache()
            self.main, self._views, self.model = [], None, None

    def take_prompt(self, other: Engine) -> None:
        """Start from `other`'s prompt cache: the keys and values of its last prompt (as many as fit), copied."""
        n = min(len(other.staged_ids), self.S)
        for mine, theirs in zip(self.staging, other.staging, strict=True):
            mine.k[:, :, :n] = theirs.k[:, :, :n]
            mine.v[:, :, :n] = theirs.v[:, :, :n]
        self.staged_ids = other.staged_ids[:n]

    # -- requests in and out ----------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        if not 1 <= req.n <= self.max_batch:
            raise LmlabError(f"n must be in [1, {self.max_batch}] (the engine's batch), got {req.n}")
        if not req.prompt or len(req.prompt) > self.S:
            raise LmlabError(f"a prompt needs 1 to {self.S} tokens (the engine's context), got {len(req.prompt)}")
        if req.s.stop and self.tokenizer is None:
            raise LmlabError("stop strings need a tokenizer to find them in the text; pass the model's tokenizer")
        self.waiting.append(req)

    def cancel(self, req: Request) -> None:
        """Stop `req`: its rows are retired before the next step."""
        req.cancelled = True

    @property
    def idle(self) -> bool:
        return not (self.rows or self.staged or self.waiting)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def abort(self) -> list[Request]:
        """Drop everything in flight (after a failed step); returns the requests that were, for their callers."""
        reqs = list(dict.fromkeys([r.req for r in self.rows] + ([self.staged] if self.staged else [])
                                  + list(self.waiting)))
        self.rows, self.staged, self.staged_ids, self.p = [], None, [], 0
        self.waiting.clear()
        return reqs

    # -- one step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Decode one token for every busy row, then prefill (and place) what the step's budget allows.
        Returns the step's tokens as (request, choice, token, finish reason) events."""
        self.events = []
        self._drop_cancelled()
        if self.rows:
            self._decode()
        self._admit()
        return self.events

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].req.cancelled:
                self._retire(i)
        if self.staged is not None and self.staged.cancelled:
            self.staged = None
        if any(r.cancelled for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        budget = self.step_prefill
        if budget is None and not self.rows and self.staged is None:
            self._admit_together()
        while budget is None or budget > 0:
            if self.staged is None:
                if not self.waiting or self.waiting[0].n > self.free:
                    return
                self.staged = self.waiting.popleft()
                self._reuse_prefix(self.staged)
            used = self._prefill_staged(budget)
            budget = None if budget is None else budget - used

    def _admit_together(self) -> None:
        """With nothing running and no budget to keep, the waiting requests that fit are prefilled together: one
        left-padded batch, straight into the main cache's rows (a batch's prompts share each weight read: 8
        prompts of 128 tokens prefill 1.4x faster so than one by one on a 2-core CPU). Each request's other
        choices copy its row."""
        group, rows = [], 0
        for req in self.waiting:
            if rows + req.n > self.max_batch:
                break
            group.append(req)
            rows += req.n
        if len(group) < 2:
            return
        for _ in group:
            self.waiting.popleft()
        L, k = max(len(r.prompt) for r in group), len(group)
        pad = [[0] * (L - len(r.prompt)) + r.prompt for r in group]
        offset = torch.tensor([L - len(r.prompt) for r in group], device=self.device)
        for lo in range(0, L, self.prefill_chunk):
            hi = min(L, lo + self.prefill_chunk)
            self.model.use_cache([c.view(slice(0, k), slice(0, hi)) for c in self.main])
            idx = torch.tensor([q[lo:hi] for q in pad], device=self.device)
            logits = self.model(idx, torch.arange(lo, hi, device=self.device), offset, last_only=True)[:, -1]
        self.p = L
        self.rows = [self._new_row(r, 0, L - len(r.prompt)) for r in group]
        for j, req in enumerate(group):
            for i in range(1, req.n):
                self._copy_row(j, len(self.rows), req.prompt)
                self.rows.append(self._new_row(req, i, L - len(req.prompt)))
        which = {id(r): j for j, r in enumerate(group)}
        self._views = None
        self._advance_all(self.rows, logits[[which[id(row.req)] for row in self.rows]])

    def _copy_row(self, src: int, dst: int, prompt: list[int]) -> None:
        a = self.p - len(prompt)
        for c in self.main:
            c.k[dst, :, a:self.p] = c.k[src, :, a:self.p]
            c.v[dst, :, a:self.p] = c.v[src, :, a:self.p]

    def _reuse_prefix(self, req: Request) -> None:
        """Start `req`'s prefill after the prompt tokens the staging cache already holds (causal attention: a
        prefix's keys and values do not depend on what follows). The last prompt token always runs, for logits."""
        m, limit = 0, min(len(self.staged_ids), len(req.prompt) - 1)
        while m < limit and self.staged_ids[m] == req.prompt[m]:
            m += 1
        req.prefilled = req.cached = m
        self.cached_tokens += m

    def _prefill_staged(self, budget: int | None) -> int:
        """Run the staged prompt's next tokens (all, or `budget` of them) into the staging cache; place it when
        done. Returns the tokens run."""
        req = self.staged
        a = req.prefilled
        b = len(req.prompt) if budget is None else min(len(req.prompt), a + budget)
        logits = self._prefill(self.staging, 0, 0, req.prompt, a, b)
        req.prefilled, self.staged_ids = b, req.prompt[:b]
        if b == len(req.prompt):
            self.staged = None
            self._place(req, logits)
        return b - a

    def _prefill(self, caches: list[KVCache], row: int, start: int, ids: list[int], a: int,
                 b: int) -> torch.Tensor | None:
        """Run ids[a:b] into cache row `row`, whose first token sits at slot `start` (positions count from there),
        ids[:a] being there already; in model calls of prefill_chunk tokens. The last token's logits (1, V)."""
        logits = None
        for lo in range(a, b, self.prefill_chunk):
            hi = min(b, lo + self.prefill_chunk)
            self.model.use_cache([c.view(slice(row, row + 1), slice(start, start + hi)) for c in caches])
            idx = torch.tensor([ids[lo:hi]], device=self.device)
            logits = self.model(idx, torch.arange(lo, hi, device=self.device), last_only=True)[:, -1]
        return logits

    def _place(self, req: Request, logits: torch.Tensor) -> None:
        """Copy the prefilled prompt into n free rows, ending at slot p, and sample each choice's first token."""
        L = len(req.prompt)
        if not self.rows:
            self.p = L
        elif self.p < L:
            self._move(L - self.p)
        start = len(self.rows)
        for i in range(req.n):
            r = start + i
            for main, staged in zip(self.main, self.staging, strict=True):
                main.k[r, :, self.p - L:self.p] = staged.k[0, :, :L]
                main.v[r, :, self.p - L:self.p] = staged.v[0, :, :L]
            self.rows.append(self._new_row(req, i, self.p - L))
        self._views = None
        self._advance_all(self.rows[start:], logits.expand(req.n, -1))

    def _new_row(self, req: Request, index: int, offset: int) -> Row:
        s, V = req.s, self.model.cfg.vocab_size
        gen = None if s.seed is None else torch.Generator(device=self.device).manual_seed((s.seed + index) % 2**63)
        seen = None
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
            seen[0, req.prompt] = True
        counts = torch.zeros(1, V, device=self.device) if req.extras.counts else None
        stream = TextStream(self.tokenizer, s.stop) if self.tokenizer is not None else None
        return Row(req, index, offset, gen, stream, seen, counts, list(req.prompt))

    def _decode(self) -> None:
        """One token for every busy row. Eager code steps rows [0, n) over slots [lo, p], lo the lowest offset
        (the slots below are no busy row's); compiled code all max_batch rows and all slots, one static shape."""
        if self.p >= self.S:
            self._make_room()
        n = len(self.rows)
        b, lo = (self.max_batch, 0) if self.compiled is not None else (n, min(r.offset for r in self.rows))
        caches = self._views_of(b, lo)
        if self.model.blocks[0].attn.cache is not caches[0]:  # a prefill (or another caller) set other caches
            self.model.use_cache(caches)
        ids = torch.tensor([[r.history[-1]] for r in self.rows] + [[0]] * (b - n), device=self.device)  # (b, 1)
        offset = torch.tensor([r.offset - lo for r in self.rows] + [self.p - lo] * (b - n),
                              device=self.device)  # an idle row reads its own slot only
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs have been read
        step = self.compiled if self.compiled is not None else self.model
        logits = step(ids, torch.tensor([self.p - lo], device=self.device), offset)[:n, -1]
        self.p += 1
        self._advance_all(self.rows, logits)

    def _views_of(self, b: int, lo: int) -> list[KVCache]:
        """The main cache's rows [0, b) from slot lo on, as views kept until either changes (the rows' count and
        lowest offset change only when rows join, leave or move); the model reads up to the query's slot."""
        if b == self.max_batch and lo == 0:
            return self.main
        if self._views is None or self._views[0] != (b, lo):
            self._views = ((b, lo), [c.view(slice(0, b), slice(lo, self.S)) for c in self.main])
        return self._views[1]

    def _make_room(self) -> None:
        """p is at the cache's end: a row that fills the whole cache slides its window, then every row moves left
        to the lowest offset."""
        for i, row in enumerate(self.rows):
            if row.offset == 0:
                self._slide(i, row)
        self._move(-min(r.offset for r in self.rows))

    def _slide(self, i: int, row: Row) -> None:
        """Keep the row's last S/2 tokens: all but the one it decodes next are prefilled again into its own row,
        ending at slot p, positions from 0 (generate's window slide, now per row)."""
        keep = row.history[-(self.S // 2):-1]
        start = self.p - len(keep)
        self._prefill(self.main, i, start, keep, 0, len(keep))
        row.offset = start
        self._views = None

    def _move(self, d: int) -> None:
        """Shift every busy row's tokens by d slots (positions go with them: they count from the offsets)."""
        n, lo = len(self.rows), min(r.offset for r in self.rows)
        for c in self.main:
            for t in (c.k, c.v):
                t[:n, :, lo + d:self.p + d] = t[:n, :, lo:self.p].clone()
        for r in self.rows:
            r.offset += d
        self.p += d

    def _retire(self, i: int) -> None:
        """Free row i: the last busy row moves into it, so busy rows stay [0, n)."""
        last = len(self.rows) - 1
        if i != last:
            src = self.rows[last]
            for c in self.main:
                for t in (c.k, c.v):
                    t[i, :, src.offset:self.p] = t[last, :, src.offset:self.p]
            self.rows[i] = src
        self.rows.pop()
        self._views = None

    # -- sampling ---------------------------------------------------------------------------------------------

    def _advance_all(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits row (len(rows), V), read them all in one host copy,
        then record them; finished rows retire."""
        x = logits.float()
        plain = [i for i, r in enumerate(rows) if r.batchable]
        if len(plain) == len(rows):  # every row greedy and plain: one argmax
            picks = x.argmax(dim=-1)
        else:
            picks = torch.empty(len(rows), dtype=torch.long, device=self.device)
            if plain:
                picks[plain] = x[plain].argmax(dim=-1)
        lps = {}
        for i, row in enumerate(rows):
            if i not in plain:
                if row.req.logprobs is not None:
                    lps[i] = torch.log_softmax(x[i], dim=-1)  # the model's own distribution, before any setting
                picks[i] = self._pick(row, x[i:i + 1])[0]
        for i, (row, token) in enumerate(zip(rows, picks.tolist(), strict=True)):
            self._record(row, token, self._logprobs(row, token, lps[i]) if i in lps else [])
        for i in reversed(range(len(self.rows))):
            if self.rows[i].finish is not None:
                self._retire(i)

    def _pick(self, row: Row, x: torch.Tensor) -> torch.Tensor:
        """One row's next token (1,) from its logits (1, V): OpenAI's extras, then lmlab's filters and draw."""
        ex = row.req.extras
        if row.counts is not None:
            x = x - ex.frequency_penalty * row.counts - ex.presence_penalty * (row.counts > 0)
        if ex.logit_bias:
            ids, bias = zip(*ex.logit_bias, strict=True)
            x = x.clone()
            x[0, list(ids)] += torch.tensor(bias, device=x.device)
        return select(x, row.req.s, row.gen, row.seen)

    def _logprobs(self, row: Row, token: int, lp: torch.Tensor) -> list:
        if token in row.req.eos:
            return []
        k = row.req.logprobs
        top = torch.topk(lp, min(k, lp.numel())) if k else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        return [(token, float(lp[token]), alternatives)]

    def _record(self, row: Row, token: int, info: list) -> None:
        """The row's new token: its end (EOS, a stop string, max_new_tokens), its text, its event and piece."""
        req = row.req
        row.history.append(token)
        row.produced += 1
        self.tokens += 1
        if row.seen is not None:
            row.seen[0, token] = True
        if row.counts is not None:
            row.counts[0, token] += 1
        if token in req.eos:
            row.finish = "stop"
        else:
            row.generated.append(token)
            if row.stream is not None and row.stream.feed(row.generated):
                row.finish = "stop"
            elif row.produced >= req.s.max_new_tokens:
                row.finish = "length"
        text = row.stream.take(final=row.finish is not None) if row.stream is not None else ""
        if req.trim_start and not row.started:
            text = text.lstrip()
            row.started = bool(text)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if row.finish is not None:
            req.done += 1
        self.events.append((req, row.index, token, row.finish))
        if req.emit is not None and (text or info or row.finish):
            req.emit(Piece(row.index, text, info, row.finish, row.produced if row.finish else 0))
