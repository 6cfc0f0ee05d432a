"""The HTTP side: a FastAPI app speaking OpenAI's API over a `Scheduler`, plus /health, /metrics and the page.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus, through prometheus_client), GET / (the chat page, lmlab/serve/static/index.html). Every error,
FastAPI's own validation errors and unknown routes included, is OpenAI's error object with a 4xx status; a full
queue is a 503 with Retry-After, a request past --request-timeout a 408. Streaming is server-sent events,
`data: {chunk}` lines ending in `data: [DONE]`, as the OpenAI API streams. A client that goes away (the stream's
task is cancelled, or a plain request's connection closes) cancels its rows before the next decoding step.

Shared with `lmlab lab` (lab.py): the API-key check, the Host check, the error handlers and `read_body`. The Host
check is the defence against DNS rebinding: a page on another site can point its own name at 127.0.0.1 and then
read a local server's answers as its own, so a server bound to one address answers only to that address and
localhost's names. An unexpected exception is logged with its traceback (by uvicorn, once) and answered as a
one-line 500 in the same error JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.config import ServeConfig
from lmlab.errors import LmlabError
from lmlab.infer.engine import Piece
from lmlab.serve import protocol as P
from lmlab.serve.scheduler import Failure, QueueFull, Scheduler

PAGE = Path(__file__).with_name("static") / "index.html"
OPEN_PATHS = ("/health", "/")  # no key needed: liveness, and a page that holds no data (its requests send the key)
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
EVERY_ADDRESS = {"0.0.0.0", "::", ""}  # --host values that listen on every address of the machine


class KeyCheck:
    """Pure ASGI middleware: every route but OPEN_PATHS needs `Authorization: Bearer KEY` (CORS preflights,
    which browsers send without it, are answered by the CORS middleware outside this one)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                error = P.APIError("missing or wrong API key: send the header Authorization: Bearer KEY",
                                   status=401, code="invalid_api_key")
                await JSONResponse(error.body(), error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_names(host: str) -> set[str] | None:
    """The names a request's Host header may give to a server listening on `host`: localhost's and `host`'s own;
    None (any name) when it listens on every address, since whoever chose that wants it reached by other names."""
    host = host.strip().strip("[]").lower()
    return None if host in EVERY_ADDRESS else LOCAL_NAMES | {host}


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1", "Localhost.:8000" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if ":" in header else header.rstrip(".")


class HostCheck:
    """Pure ASGI middleware: a request whose Host header names another server (DNS rebinding, see the module's
    docstring) is a 400 in OpenAI's error JSON. A request without the header (HTTP/1.0) passes: a browser always
    sends it."""

    def __init__(self, app, host: str) -> None:
        self.app, self.allowed, self.host = app, host_names(host), host

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            given = dict(scope["headers"]).get(b"host")
            name = _host_name(given.decode("latin-1")) if given is not None else None
            if name is not None and name not in self.allowed:
                error = P.APIError(f"the Host header names {name!r}, but this server listens on {self.host} and "
                                   f"answers only to {', '.join(sorted(self.allowed))}; to reach it by other names, "
                                   "start it with --host 0.0.0.0", "host", code="invalid_host")
                await JSONResponse(error.body(), error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def guard(app: FastAPI, host: str, api_key: str | None, cors: bool = False) -> None:
    """The middleware both servers put before their routes, outermost last: the API key, CORS (serve's API is
    for other origins' pages too; the lab's is not), and the Host check around everything."""
    if api_key is not None:
        app.add_middleware(KeyCheck, key=api_key)
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HostCheck, host=host)


class Call:
    """One HTTP request's jobs, and the queue the scheduler thread fills with their pieces."""

    def __init__(self, scheduler: Scheduler, body: P.Sampling, pairs: list, logprobs: int | None) -> None:
        self.scheduler, self.n = scheduler, body.n
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs = P.make_jobs(body, pairs, logprobs, lambda i: (lambda event: self._put(i, event)),
                                scheduler.engine.tokenizer)
        self.remaining = len(self.jobs) * body.n
        self.prompt_tokens = sum(len(job.prompt) for job in self.jobs)

    def _put(self, i: int, event: Piece | Failure) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    def submit(self) -> None:
        try:
            for job in self.jobs:
                self.scheduler.submit(job)
        except QueueFull:
            self.cancel()
            raise P.APIError(f"the server is busy ({self.scheduler.waiting} requests waiting); retry shortly",
                             status=503, type="server_error", code="server_busy") from None

    def cancel(self) -> None:
        for job in self.jobs:
            self.scheduler.cancel(job)

    async def pieces(self, request: Request | None = None) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) until every choice has finished. With `request`, a closed connection cancels."""
        while self.remaining:
            try:
                i, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if isinstance(event, Failure):
                self.cancel()
                raise P.APIError(event.message, status=event.status, type="server_error", code=event.code)
            if event.finish_reason is not None:
                self.remaining -= 1
            yield i * self.n + event.index, event

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(job.cached for job in self.jobs)}}


def _error_response(e: P.APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), e.status, headers=headers)


def create_app(lm, cfg: ServeConfig) -> FastAPI:
    """The app for a loaded model (`lmlab.load`); its scheduler thread runs while the app does (lifespan)."""
    scheduler = Scheduler(lm.model, lm.tokenizer, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.model_id = scheduler, lm.source
    guard(app, cfg.host, cfg.api_key, cors=True)
    add_error_handlers(app)
    _add_routes(app, lm, scheduler)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error JSON: ours (APIError), the library's refusals (LmlabError: a 400 naming its
    field), FastAPI's validation and routing errors, and anything unexpected (a 500 whose one line names the
    exception; Starlette raises it on after this answer, so uvicorn logs its traceback once)."""
    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError):
        return _error_response(e)

    @app.exception_handler(LmlabError)
    async def refused(request: Request, e: LmlabError):
        return _error_response(P.APIError(str(e), e.field))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _error_response(P.validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(P.APIError(message, status=e.status_code, code=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        what = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        message = f"{request.method} {request.url.path} failed on the server ({what}); its log has the details"
        return _error_response(P.APIError(message, status=500, type="server_error", code="internal_error"))


def _check_model(app: FastAPI, body: P.Sampling) -> None:
    if body.model is not None and body.model != app.state.model_id:
        raise P.APIError(f"model {body.model!r} does not exist here; this server serves {app.state.model_id!r} "
                         "(GET /v1/models)", "model", status=404, code="model_not_found")


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends a form type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise P.APIError(f"the request body is not valid JSON ({e}); send a JSON object") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise P.validation_error(e) from None


def _add_routes(app: FastAPI, lm, scheduler: Scheduler) -> None:
    tok, vocab, context, max_batch = lm.tokenizer, lm.config.vocab_size, scheduler.S, scheduler.cfg.max_batch

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": app.state.model_id, "object": "model", "created": 0,
                                            "owned_by": "lmlab", "context_length": context}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(scheduler.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, P.ChatRequest)
        _check_model(app, body)
        P.check_sampling(body, max_batch, vocab)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise P.APIError(f"top_logprobs must be in [0, 20], got {body.top_logprobs}", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        call = Call(scheduler, body, P.chat_jobs(body, tok, context), logprobs)
        return await _respond(call, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, P.CompletionRequest)
        _check_model(app, body)
        P.check_sampling(body, max_batch, vocab)
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise P.APIError(f"logprobs must be in [0, 20], got {body.logprobs}", "logprobs")
        call = Call(scheduler, body, P.completion_jobs(body, tok, context, vocab), body.logprobs)
        return await _respond(call, body, request, chat=False)

    async def _respond(call: Call, body: P.Sampling, request: Request, chat: bool):
        call.submit()
        if body.stream:
            return StreamingResponse(_stream(call, body, tok, chat, app.state.model_id),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(call, request, tok, chat, app.state.model_id)


async def _collect(call: Call, request: Request, tok, chat: bool, model_id: str) -> JSONResponse | dict:
    """A whole (non-streamed) response."""
    count = call.remaining
    texts, tokens = [""] * count, [[] for _ in range(count)]
    finish, produced, logprobs = [None] * count, 0, call.jobs[0].logprobs is not None
    try:
        async for index, piece in call.pieces(request):
            texts[index] += piece.text
            tokens[index] += piece.tokens
            if piece.finish_reason is not None:
                finish[index], produced = piece.finish_reason, produced + piece.completion_tokens
    finally:
        call.cancel()
    choices = []
    for i in range(count):
        if chat:
            lp = P.chat_logprobs(tok, tokens[i]) if logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp,
                            "finish_reason": finish[i]})
        else:
            lp = P.completion_logprobs(tok, tokens[i], 0) if logprobs else None
            choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
    return {"id": P.new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else
            "text_completion", "created": P.now(), "model": model_id, "system_fingerprint": None,
            "choices": choices, "usage": call.usage(produced)}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(call: Call, body: P.Sampling, tok, chat: bool, model_id: str) -> AsyncIterator[str]:
    """Server-sent events: chunks as pieces arrive, then the usage chunk when asked for, then [DONE]."""
    usage = body.stream_options is not None and body.stream_options.include_usage
    head = {"id": P.new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion.chunk" if chat else
            "text_completion", "created": P.now(), "model": model_id, "system_fingerprint": None}
    extra = {"usage": None} if usage else {}
    logprobs, produced, offsets = call.jobs[0].logprobs is not None, 0, {}

    def chunk(index: int, text: str | None, tokens: list, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            lp = P.chat_logprobs(tok, tokens) if logprobs and tokens else None
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            lp = P.completion_logprobs(tok, tokens, offsets.get(index, 0)) if logprobs and tokens else None
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **extra})

    try:
        if chat:
            for i in range(call.remaining):
                yield chunk(i, None, [], None, role=True)
        async for index, piece in call.pieces():
            if piece.text or piece.tokens:
                yield chunk(index, piece.text, piece.tokens, None)
                offsets[index] = offsets.get(index, 0) + len(piece.text)
            if piece.finish_reason is not None:
                produced += piece.completion_tokens
                yield chunk(index, None, [], piece.finish_reason)
        if usage:
            yield _sse({**head, "choices": [], "usage": call.usage(produced)})
    except P.APIError as e:
        yield _sse(e.body())
    finally:
        call.cancel()  # a no-op for finished jobs; frees the rows of a client that went away
    yield _sse("[DONE]")
