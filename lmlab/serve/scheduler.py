"""Continuous batching: one thread owns the model and steps every running request together.

The batch is one static KV cache of `max_batch` rows (`Transformer.make_cache`). All busy rows write their next
token into the same slot `p` (the write pointer), and row r's tokens fill slots [offset[r], p): positions count
from offset[r] (the model's left-padding API), so rows of different lengths share a step, and a row's keys
carry its own positions whatever slots it sits in. Between decoding steps the scheduler

- prefills queued prompts, `prefill_chunk` tokens per step at most, into a one-row staging cache (Orca's
  iteration-level scheduling, Yu et al. OSDI 2022; Sarathi's chunked prefill, Agrawal et al. 2023), so a long
  prompt delays the running rows by one chunk per step, never by its whole prefill. The staging cache keeps the
  last prompt's keys and values, and a prompt that begins like it is prefilled from where they part (llama.cpp
  server's prompt cache): the chat template's system turn, or a conversation's earlier turns, are run once;
- places a fully prefilled prompt into free rows, ending at slot p (the rows' content is moved right first
  when p is smaller than the prompt), one row per choice (`n`): the prompt is prefilled once;
- retires finished or cancelled rows at once, moving the last busy row into the hole, so busy rows are always
  rows [0, n) and a step runs over them alone (`KVCache.view`), over slots [min offset, p] alone;
- moves every row left when p reaches the end of the cache (a row never holds more than the context).

Sampling is lmlab.infer.generate's (`select`, `TextStream` for stop strings and whole UTF-8 characters), per row with
the row's own settings and its own torch.Generator, so a seeded request draws the same tokens alone or beside
others. OpenAI's presence/frequency penalties and logit_bias are applied to the logits before `select`.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.errors import LmlabError
from lmlab.infer.generate import SamplingConfig, TextStream, select
from lmlab.model import KVCache, Transformer
from lmlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class ServeConfig:
    """The server's knobs, validated once. `context` 0 means the model's context, at most 2048 slots: the cache
    holds max_batch x context tokens of keys and values (for SmolLM2-135M, 94 MB per row at 2048)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; more get HTTP 503 with Retry-After
    context: int = 0
    prefill_chunk: int = 256  # prompt tokens prefilled between two decoding steps at most
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name, low, high in (("port", 0, 65535), ("max_batch", 1, 1024), ("max_queue", 0, 1_000_000),
                                ("context", 0, 1 << 24), ("prefill_chunk", 1, 1 << 20)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise LmlabError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise LmlabError(f"host must be an address such as 127.0.0.1 or 0.0.0.0, got {self.host!r}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable() or " " in self.api_key):
            raise LmlabError("api_key must be a non-empty printable string without spaces")

    def slots(self, model_context: int) -> int:
        return min(model_context, self.context or 2048)


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
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int = 0  # on the last piece: tokens generated, EOS included


@dataclass
class Failure:
    message: str


@dataclass
class Job:
    """One prompt and its n choices. `emit` is called from the scheduler thread with each Piece or a Failure."""

    prompt: list[int]
    s: SamplingConfig
    emit: Callable[[Piece | Failure], None]
    n: int = 1
    extras: Extras = Extras()
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    prefilled: int = 0  # prompt tokens in the staging cache
    cached: int = 0  # of those, how many were there already (a prefix shared with the previous prompt)
    first_token_at: float | None = None


class QueueFull(Exception):
    pass


@dataclass
class Row:
    """A choice being decoded: its sampling state and where its tokens sit in the cache."""

    job: Job
    index: int
    offset: int  # the cache slot of its first prompt token
    gen: torch.Generator
    stream: TextStream
    seen: torch.Tensor | None  # (1, V) prompt and generated tokens, for the repetition penalty
    counts: torch.Tensor | None  # (1, V) generated tokens, for presence/frequency penalties
    generated: list[int] = field(default_factory=list)  # EOS excluded: the text's ids
    produced: int = 0  # tokens sampled, EOS included
    next_token: int = 0  # sampled, not yet in the cache
    finish: str | None = None


class Metrics:
    """Counters for /metrics (read without a lock: each is one Python int or float)."""

    def __init__(self) -> None:
        self.requests = self.tokens = self.failures = self.cached_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0


class Scheduler:
    """Owns the model on its own thread; `submit` queues a Job, the thread answers through job.emit."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cfg: ServeConfig) -> None:
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.S = cfg.slots(model.cfg.context_length)
        self.device = model.wte.weight.device
        self.eos = set(tokenizer.eos_ids)
        self.metrics = Metrics()
        self.queue: deque[Job] = deque()
        self.wake = threading.Condition()
        self.rows: list[Row] = []
        self.staged: Job | None = None
        self.staged_ids: list[int] = []  # the tokens whose keys and values fill the staging cache's first slots
        self.p = 0  # the slot every busy row writes its next token to
        self.running = False
        self.thread: threading.Thread | None = None
        model.eval()
        self.main = model.make_cache(cfg.max_batch, self.S)
        self.staging = model.make_cache(1, self.S)

    # -- the HTTP side ----------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.queue) >= self.cfg.max_queue:
                raise QueueFull
            self.queue.append(job)
            self.metrics.requests += 1
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job`: its rows are retired before the next step (a disconnected client frees them at once)."""
        with self.wake:
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
            self.wake.notify()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def busy(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="lmlab-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- the scheduler thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while self.running and not (self.rows or self.staged or self.queue):
                        self.wake.wait()
                    if not self.running:
                        return
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the server
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _step(self) -> None:
        """One iteration: retire cancelled rows, prefill up to one chunk of prompts, decode one token per row."""
        self._drop_cancelled()
        budget = self.cfg.prefill_chunk
        while budget > 0:
            if self.staged is None:
                self.staged = self._next_job()
                if self.staged is None:
                    break
                self._reuse_prefix(self.staged)
            budget -= self._prefill(self.staged, budget)
        if self.rows:
            self._decode()

    def _next_job(self) -> Job | None:
        with self.wake:
            if self.queue and self.queue[0].n <= self.cfg.max_batch - len(self.rows):
                return self.queue.popleft()
        return None

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].job.cancelled:
                self._retire(i)
        if self.staged is not None and self.staged.cancelled:
            self.staged = None

    def _fail_all(self, message: str) -> None:
        jobs = {id(r.job): r.job for r in self.rows}
        if self.staged is not None:
            jobs[id(self.staged)] = self.staged
        self.rows, self.staged, self.staged_ids, self.p = [], None, [], 0
        self.metrics.failures += len(jobs)
        for job in jobs.values():
            job.emit(Failure(message))

    def _views(self, caches: list[KVCache], rows: slice, slots: slice) -> None:
        self.model.use_cache([c.view(rows, slots) for c in caches])

    def _reuse_prefix(self, job: Job) -> None:
        """Start `job`'s prefill after the prompt tokens the staging cache already holds (causal attention: a
        prefix's keys and values do not depend on what follows). The last prompt token always runs, for logits."""
        m, limit = 0, min(len(self.staged_ids), len(job.prompt) - 1)
        while m < limit and self.staged_ids[m] == job.prompt[m]:
            m += 1
        job.prefilled = job.cached = m
        self.metrics.cached_tokens += m

    def _prefill(self, job: Job, budget: int) -> int:
        """Run the next chunk of `job`'s prompt into the staging cache; place it when done. Returns tokens run."""
        a = job.prefilled
        b = min(len(job.prompt), a + budget)
        self._views(self.staging, slice(0, 1), slice(0, b))
        idx = torch.tensor([job.prompt[a:b]], device=self.device)
        logits = self.model(idx, torch.arange(a, b, device=self.device), last_only=True)[:, -1]  # (1, V)
        job.prefilled, self.staged_ids = b, job.prompt[:b]
        if b == len(job.prompt):
            self.staged = None
            self._place(job, logits)
        return b - a

    def _place(self, job: Job, logits: torch.Tensor) -> None:
        """Copy the prefilled prompt into n free rows, ending at slot p, and sample each choice's first token."""
        L = len(job.prompt)
        if not self.rows:
            self.p = L
        elif self.p < L:
            self._move(L - self.p)
        start = len(self.rows)
        for i in range(job.n):
            r = start + i
            for main, staged in zip(self.main, self.staging, strict=True):
                main.k[r, :, self.p - L:self.p] = staged.k[0, :, :L]
                main.v[r, :, self.p - L:self.p] = staged.v[0, :, :L]
            self.rows.append(self._new_row(job, i, self.p - L))
        for row in self.rows[start:]:
            self._advance(row, logits)
        self._retire_finished()

    def _new_row(self, job: Job, index: int, offset: int) -> Row:
        s = job.s
        seed = random.getrandbits(63) if s.seed is None else (s.seed + index) % 2**63
        V = self.model.cfg.vocab_size
        seen = None
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
            seen[0, job.prompt] = True
        counts = torch.zeros(1, V, device=self.device) if job.extras.counts else None
        return Row(job, index, offset, torch.Generator(device=self.device).manual_seed(seed),
                   TextStream(self.tok, s.stop), seen, counts)

    def _decode(self) -> None:
        """One token for every busy row: a step over rows [0, n) and slots [min offset, p]."""
        if self.p >= self.S:  # the cache is full: move every row left (none holds more than the context)
            self._move(-min(r.offset for r in self.rows))
        n, lo = len(self.rows), min(r.offset for r in self.rows)
        self._views(self.main, slice(0, n), slice(lo, self.p + 1))
        idx = torch.tensor([[r.next_token] for r in self.rows], device=self.device)  # (n, 1)
        offset = torch.tensor([r.offset - lo for r in self.rows], device=self.device)
        logits = self.model(idx, torch.tensor([self.p - lo], device=self.device), offset)[:, -1]  # (n, V)
        self.p += 1
        for i, row in enumerate(self.rows):
            self._advance(row, logits[i:i + 1])
        self._retire_finished()

    def _move(self, d: int) -> None:
        """Shift every busy row's tokens by d slots (positions go with them: they count from the offsets)."""
        n, lo = len(self.rows), min(r.offset for r in self.rows)
        for c in self.main:
            for t in (c.k, c.v):
                t[:n, :, lo + d:self.p + d] = t[:n, :, lo:self.p].clone()
        for r in self.rows:
            r.offset += d
        self.p += d

    def _retire_finished(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].finish is not None:
                self._retire(i)

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

    # -- sampling ---------------------------------------------------------------------------------------------

    def _advance(self, row: Row, logits: torch.Tensor) -> None:
        """Sample the row's next token from logits (1, V), update its text and hand out what is ready."""
        job = row.job
        token, info = self._choose(row, logits)
        row.produced += 1
        self.metrics.tokens += 1
        if token in self.eos:
            row.finish = "stop"
        else:
            row.generated.append(token)
            if row.stream.feed(row.generated):
                row.finish = "stop"
            elif row.produced >= job.s.max_new_tokens or len(job.prompt) + row.produced >= self.S:
                row.finish = "length"
        row.next_token = token
        text = row.stream.take(final=row.finish is not None)
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft_sum += job.first_token_at - job.submitted
            self.metrics.ttft_count += 1
        if text or info or row.finish:
            job.emit(Piece(row.index, text, info, row.finish, row.produced if row.finish else 0))

    def _choose(self, row: Row, logits: torch.Tensor) -> tuple[int, list]:
        job = row.job
        x = logits.float()
        info = []
        if job.logprobs is not None:
            lp = torch.log_softmax(x, dim=-1)[0]  # the model's own distribution, before any sampling setting
        if row.counts is not None:
            x = x - job.extras.frequency_penalty * row.counts - job.extras.presence_penalty * (row.counts > 0)
        if job.extras.logit_bias:
            ids, bias = zip(*job.extras.logit_bias, strict=True)
            x[0, list(ids)] += torch.tensor(bias, device=x.device)
        token = int(select(x, job.s, row.gen, row.seen)[0])
        if row.seen is not None:
            row.seen[0, token] = True
        if row.counts is not None:
            row.counts[0, token] += 1
        if job.logprobs is not None and token not in self.eos:
            top = torch.topk(lp, min(job.logprobs, lp.numel())) if job.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
            info = [(token, float(lp[token]), alternatives)]
        return token, info
