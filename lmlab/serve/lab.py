"""`lmlab lab`: a local page to watch and compare runs live, and to look inside sampling and dropout.

One FastAPI app on serve's pieces (the API-key and Host checks, OpenAI's error JSON for every failure, 127.0.0.1
unless told otherwise); the library does the work: lmlab.training.runs (settings, status), lmlab.training.metrics
(EventTail), lmlab.infer.distribution (the filters' and dropout's effect), lmlab/serve/loads.py (models loaded on
threads) and lmlab/serve/reports.py (study reports). Routes:

    GET  /                     the page (static/lab.html: plain HTML, JS and hand-drawn SVG, nothing from elsewhere)
    GET  /health
    GET  /lab/runs             every run under --runs: settings, status, best val loss
    GET  /lab/events?run=NAME&run=...  server-sent events: each run's events, then each new one as the run appends
                               it, and its status whenever that changes ("events", "restart", "status", "error")
    GET  /lab/models           the models loading or loaded; POST {"source"} starts a load
    POST /lab/next             {"model", "prompt", sampling settings}: the next-token distribution, filtered
    POST /lab/steps            the same and "steps": a generation stepped token by token
    POST /lab/dropout          {"model", "prompt", "passes", "rate"}: eval mode beside train mode
    GET  /lab/studies          the study reports; GET /lab/study?id=ID one of them, as HTML
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from lmlab.config import LabConfig, SamplingConfig
from lmlab.errors import LmlabError
from lmlab.infer import distribution as D
from lmlab.serve import protocol as P
from lmlab.serve.app import add_error_handlers, guard, read_body
from lmlab.serve.loads import Loads
from lmlab.serve.reports import find_studies, render_report, source_tree_studies
from lmlab.training.metrics import EventTail
from lmlab.training.runs import Progress, RunIndex, run_status, runs_by_name

PAGE = Path(__file__).with_name("static") / "lab.html"
POLL_S = 0.5  # how often a followed run's log is read: the page sees a new line within a second


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Look(_Body):
    """A sampling-view request: SamplingConfig's filters, checked there."""

    model: str
    prompt: str
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    steps: int = 16
    top: int = D.TOP


class Dropout(_Body):
    model: str
    prompt: str
    passes: int = 20
    rate: float | None = None
    top: int = 20


class Source(_Body):
    source: str


def folders(cfg: LabConfig) -> tuple[Path, dict[str, Path]]:
    """(the runs folder, {label: folder} of study reports), or one line saying which folder is missing."""
    runs = Path(cfg.runs)
    if not runs.is_dir():
        what = "is a file, not a folder" if runs.exists() else "does not exist"
        raise LmlabError(f"--runs {runs} {what}; give the folder your runs are in (lmlab train --out FOLDER/NAME "
                         "writes one there)")
    studies = {"runs": runs}
    if cfg.studies:
        if not Path(cfg.studies).is_dir():
            raise LmlabError(f"--studies {cfg.studies} is not a folder; give one that holds study reports")
        studies["studies"] = Path(cfg.studies)
    elif source_tree_studies() is not None:
        studies["docs"] = source_tree_studies()
    return runs, studies


def create_lab_app(cfg: LabConfig, load_settings: dict[str, Any] | None = None) -> FastAPI:
    """The app. `load_settings` are lmlab.load's keywords for every model the page loads (device, dtype, ...)."""
    runs, studies = folders(cfg)
    app = FastAPI(title="lmlab lab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs, app.state.studies = runs, studies
    app.state.index, app.state.loads = RunIndex(runs), Loads(load_settings or {}, keep=cfg.max_models)
    guard(app, cfg.host, cfg.api_key)
    add_error_handlers(app)
    _run_routes(app)
    _model_routes(app)
    return app


def finite(x: Any) -> Any:
    """`x` with every NaN or infinity as None: JSON has neither (a run's best val is inf before its first eval)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


async def _run_dirs(app: FastAPI, names: list[str]) -> dict[str, Path]:
    """{name: folder} of the runs NAMES, looked up among the runs GET /lab/runs lists (never joined to a path:
    ".." or a NUL is just a name that is not there); a 404 for the first that is not one of them."""
    found = await asyncio.to_thread(runs_by_name, app.state.runs)
    for name in names:
        if name not in found:
            raise P.APIError(f"no run {name!r} under {app.state.runs} (GET /lab/runs lists them)", "run",
                             status=404, code="run_not_found")
    return {name: found[name] for name in names}


def _run_routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/lab/runs")
    async def runs():
        return finite({"root": str(app.state.runs), "runs": await asyncio.to_thread(app.state.index.describe)})

    @app.get("/lab/events")
    async def events(request: Request, run: Annotated[list[str], Query()]):
        return StreamingResponse(_follow(request, await _run_dirs(app, run)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/lab/studies")
    async def studies():
        found = await asyncio.to_thread(find_studies, app.state.studies)
        return {"studies": [{"id": sid, "path": str(folder)} for sid, folder in found.items()]}

    @app.get("/lab/study")
    async def study(id: str):
        found = await asyncio.to_thread(find_studies, app.state.studies)
        if id not in found:
            raise P.APIError(f"no study report {id!r} (GET /lab/studies lists them)", "id", status=404)
        return {"id": id, "html": await asyncio.to_thread(render_report, found[id])}


def _sse(kind: str, run: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(finite({'run': run, 'data': data}))}\n\n"


async def _follow(request: Request, runs: dict[str, Path]) -> AsyncIterator[str]:
    """Runs' events as server-sent events, on one connection (a browser opens six to a host at most): all of each
    run's events, then new ones as they are appended; its status when it changes; "restart" when its log was
    rewritten (a resumed run); "error" for a damaged log, which is then no longer followed. Of the events only
    their Progress is kept (the status needs no more); the connection stays open until the client leaves."""
    tails = {name: EventTail(path / "metrics.jsonl") for name, path in runs.items()}
    progress = {name: Progress() for name in runs}
    status: dict[str, dict] = {}
    while not await request.is_disconnected():
        for name, tail in list(tails.items()):
            error = None
            try:
                new, restart = await asyncio.to_thread(tail.read)
            except LmlabError as e:
                del tails[name]
                new, restart, error = [], False, str(e)
                yield _sse("error", name, {"message": error})
            if restart:
                progress[name] = Progress()
                yield _sse("restart", name, {})
            if new:
                progress[name].add(new)
                yield _sse("events", name, new)
            now = await asyncio.to_thread(run_status, runs[name], progress[name], error)
            if now != status.get(name):
                status[name] = now
                yield _sse("status", name, now)
        await asyncio.sleep(POLL_S)


async def _json(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, sent as JSON: another site's page can post a form or text to this one without asking
    (no CORS preflight), but not JSON, so nothing it sends reaches the model loader."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise P.APIError("send the body as JSON, with Content-Type: application/json", status=415,
                         code="unsupported_media_type")
    return await read_body(request, model)


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _sampling(body: Look) -> SamplingConfig:
    """The request's filters as SamplingConfig, whose checks say what is wrong; each setting is first checked
    alone, so that the error names the one at fault as its param."""
    settings = {name: getattr(body, name) for name in SAMPLING}
    for name, value in settings.items():
        try:
            SamplingConfig(**{name: value})
        except LmlabError as e:
            raise P.APIError(str(e), name) from None
    return SamplingConfig(**settings)


async def _with_model(app: FastAPI, request: Request, source: str, work: Callable[[Any, Callable], Any]) -> Any:
    """`work(lm, gone)` on a worker thread under the model's lock; `gone()` turns true once the client has left,
    so that a long computation stops (the library's refusals, LmlabError, reach the error handler as 400s)."""
    entry, left = app.state.loads.get(source), threading.Event()

    def locked():
        with entry.lock:
            if entry.lm is None:
                raise P.APIError(f"model {source!r} was unloaded to make room for another; load it again", "model",
                                 status=404, code="model_not_found")
            return work(entry.lm, left.is_set)

    task = asyncio.ensure_future(asyncio.to_thread(locked))
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and await request.is_disconnected():
            left.set()
    return finite(task.result())


def _model_routes(app: FastAPI) -> None:
    loads: Loads = app.state.loads

    @app.get("/lab/models")
    async def models():
        return {"models": loads.statuses()}

    @app.post("/lab/models")
    async def load(request: Request):
        body = await _json(request, Source)
        try:
            return loads.start(body.source).status()
        except LmlabError as e:  # an empty source is a bad request; one that names nothing is not found
            if e.field == "source":
                raise
            raise P.APIError(str(e), "source", status=404, code="model_not_found") from None

    @app.post("/lab/next")
    async def next_token(request: Request):
        body = await _json(request, Look)
        s, top = _sampling(body), _top(body.top)
        return await _with_model(app, request, body.model, lambda lm, gone: D.next_token(
            lm.model, lm.tokenizer, body.prompt, s, top))

    @app.post("/lab/steps")
    async def steps(request: Request):
        body = await _json(request, Look)
        s, top = _sampling(body), _top(body.top)
        return {"steps": await _with_model(app, request, body.model, lambda lm, gone: D.step_through(
            lm.model, lm.tokenizer, body.prompt, s, body.steps, top, gone))}

    @app.post("/lab/dropout")
    async def dropout(request: Request):
        body = await _json(request, Dropout)
        top = _top(body.top)
        return await _with_model(app, request, body.model, lambda lm, gone: D.dropout_spread(
            lm.model, lm.tokenizer, body.prompt, body.passes, body.rate, top, gone))


def _top(top: int) -> int:
    if not 1 <= top <= 500:
        raise P.APIError(f"top must be in [1, 500], got {top}", "top")
    return top
