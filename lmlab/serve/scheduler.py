"""The server's scheduler: one thread and a queue around the engine (lmlab.infer.engine), and the counters.

HTTP handlers `submit` requests and `cancel` them from any thread; one thread owns the model and the engine: it
hands queued requests to the engine, steps it (continuous batching: rows join and leave between steps, long
prompts are prefilled a chunk per step), and each request hears its pieces through its `emit`, on that thread.
A request past `request_timeout` seconds, or one whose step failed, hears a Failure instead and its rows are freed;
a failure ends the requests in flight, never the server.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from lmlab.config import ServeConfig
from lmlab.infer.engine import Engine, Piece, Request
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

# Histogram buckets, seconds: time to first token, and time per output token after it.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Failure:
    message: str
    status: int = 500
    code: str | None = None


class QueueFull(Exception):
    pass


class Metrics:
    """The server's Prometheus metrics (prometheus_client, in a registry of its own: one per app), read at
    /metrics: request, failure and token counters, queue and batch gauges, and the two latency histograms."""

    def __init__(self, scheduler: Scheduler) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmlab_requests", "requests (prompts) accepted", registry=r)
        self.failures = Counter("lmlab_request_failures", "requests ended by a failed step or their time limit",
                                registry=r)
        self.ttft = Histogram("lmlab_time_to_first_token_seconds", "time from a request's arrival to its first "
                              "token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("lmlab_time_per_output_token_seconds", "a finished choice's time per token after its "
                              "first", buckets=TPOT_BUCKETS, registry=r)
        Gauge("lmlab_queue_length", "requests waiting for a row", registry=r).set_function(lambda: scheduler.waiting)
        Gauge("lmlab_batch_rows_busy", "rows of the batch decoding now", registry=r).set_function(
            lambda: scheduler.busy)
        Gauge("lmlab_batch_rows", "rows of the batch (--max-batch)", registry=r).set(scheduler.cfg.max_batch)
        r.register(EngineCounters(scheduler.engine))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class EngineCounters:
    """The engine's own counters as Prometheus counters, read when /metrics is scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("lmlab_generated_tokens", "tokens sampled", value=self.engine.tokens)
        yield CounterMetricFamily("lmlab_cached_prompt_tokens", "prompt tokens not prefilled again (prompt cache)",
                                  value=self.engine.cached_tokens)


class Scheduler:
    """Owns the model and its engine on one thread; `submit` queues a Request, the thread answers through its
    emit (Pieces, or one Failure)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.S = cfg.window(model.cfg.context_length)  # the window every request decodes in
        model.eval()
        self.engine = Engine(model, tokenizer, cfg.max_batch, self.S, prefill_chunk=cfg.prefill_chunk,
                             step_prefill=cfg.prefill_chunk)
        self.queue: deque[Request] = deque()
        self.wake = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.metrics = Metrics(self)

    # -- the HTTP side ----------------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self.wake:
            if self.waiting >= self.cfg.max_queue:
                raise QueueFull
            self.queue.append(req)
            self.metrics.requests.inc()
            self.wake.notify()

    def cancel(self, req: Request) -> None:
        """Stop `req`: its rows are retired before the next step (a disconnected client frees them at once)."""
        with self.wake:
            req.cancelled = True
            if req in self.queue:
                self.queue.remove(req)
            self.wake.notify()

    @property
    def waiting(self) -> int:
        return len(self.queue) + len(self.engine.waiting)

    @property
    def busy(self) -> int:
        return len(self.engine.rows)

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
        while True:
            with self.wake:
                while self.running and not self.queue and self.engine.idle:
                    self.wake.wait()
                if not self.running:
                    return
                while self.queue:
                    self.engine.add(self._watched(self.queue.popleft()))
            self._expire()
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the server
                traceback.print_exc(file=sys.stderr)
                self._fail(self.engine.abort(), Failure(f"generation failed: {type(e).__name__}: {e}"))

    def _watched(self, req: Request) -> Request:
        """`req` with its emit wrapped to feed the latency histograms."""
        emit, started = req.emit, {}

        def watched(piece: Piece | Failure) -> None:
            if isinstance(piece, Failure):
                emit(piece)
                return
            now = time.perf_counter()
            if not started:
                self.metrics.ttft.observe(now - req.submitted)
            started.setdefault(piece.index, now)
            if piece.finish_reason is not None and piece.completion_tokens > 1:
                self.metrics.tpot.observe((now - started[piece.index]) / (piece.completion_tokens - 1))
            emit(piece)

        req.emit = watched
        return req

    def _expire(self) -> None:
        """End the requests past their total time limit (--request-timeout) with an error; their rows are freed."""
        limit = self.cfg.request_timeout
        if not limit:
            return
        now = time.perf_counter()
        late = [r for r in self._in_flight() if not r.cancelled and now - r.submitted > limit]
        for req in late:
            req.cancelled = True
        self._fail(late, Failure(f"the request ran past this server's time limit of {limit:g} s (--request-timeout); "
                                 "ask for fewer tokens, or retry", status=408, code="request_timeout"))

    def _in_flight(self) -> list[Request]:
        e = self.engine
        return list(dict.fromkeys([r.req for r in e.rows] + ([e.staged] if e.staged else []) + list(e.waiting)))

    def _fail(self, reqs: list[Request], failure: Failure) -> None:
        for req in reqs:
            self.metrics.failures.inc()
            if req.emit is not None:
                req.emit(failure)
