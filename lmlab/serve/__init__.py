"""`lmlab serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.

scheduler.py  one thread and a queue around lmlab.infer.engine's engine (which holds the batched KV cache, the
              chunked prefill, the prompt cache and per-row sampling, as for every other caller), the request
              time limit and the Prometheus metrics
protocol.py   OpenAI's request and response shapes, validated into lmlab.config's SamplingConfig
app.py        the FastAPI routes, server-sent events, API key, CORS, /metrics
static/       the chat page served at /, and the lab's page

`lmlab lab` is a second app on the same pieces (lab.py): runs watched live, sampling and dropout laid open, study
reports (loads.py: models loaded on threads; reports.py: report.md as HTML).

Both bind to 127.0.0.1 unless told otherwise; see `serve` and `run_lab`. The server's window (ServeConfig.window) is
the model's context, or --context where smaller; it says so when it starts (`window_note`).
"""

from __future__ import annotations

import socket
from typing import Any

from lmlab.config import LabConfig, ServeConfig
from lmlab.errors import LmlabError

__all__ = ["LabConfig", "ServeConfig", "check_address", "create_app", "read_key_file", "run_lab", "serve",
           "window_note"]


def create_app(lm, cfg: ServeConfig):
    from lmlab.serve.app import create_app as make

    return make(lm, cfg)


def check_address(cfg: ServeConfig | LabConfig) -> None:
    """Fail before the model loads, with the fix, when the address cannot be bound (taken, or not this host's)."""
    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(address)
    except (OSError, UnicodeError, ValueError) as e:
        raise LmlabError(f"cannot listen on {cfg.host}:{cfg.port} ({getattr(e, 'strerror', None) or e}); "
                         "pick another --port, or a --host of this machine") from None


def read_key_file(path: str) -> str:
    """The API key in a file's first line (--api-key-file), so it stays out of the process list and the shell's
    history."""
    from lmlab.utils import read_text

    lines = read_text(path, "API key file").strip().splitlines()
    if not lines or not lines[0].strip():
        raise LmlabError(f"--api-key-file {path} is empty; write the key on its first line")
    return lines[0].strip()


def window_note(cfg: ServeConfig, model_context: int) -> str | None:
    """The line a server whose window is smaller than its model's context prints when it starts: there a long
    reply slides its window sooner than `lmlab generate`'s and `lmlab chat`'s, so their texts part from there."""
    window = cfg.window(model_context)
    if window >= model_context:
        return None
    return (f"lmlab serve: requests decode in a window of {window} tokens, less than the model's context of "
            f"{model_context}: a prompt and reply longer than {window} tokens slide the window there and differ "
            f"from lmlab generate's; --context {model_context} widens it (the KV cache holds --max-batch x window "
            "tokens)")


def serve(lm, cfg: ServeConfig) -> None:
    """Serve `lm` (from lmlab.load) until interrupted."""
    import uvicorn

    app = create_app(lm, cfg)
    where = f"http://{cfg.host}:{cfg.port}"
    print(f"lmlab serve: {lm.source} at {where} (chat page {where}/, API {where}/v1; {cfg.max_batch} rows of "
          f"{app.state.scheduler.S} tokens){'; API key required' if cfg.api_key else ''}", flush=True)
    note = window_note(cfg, lm.config.context_length)
    if note is not None:
        print(note, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=2)


def run_lab(cfg: LabConfig, load_settings: dict[str, Any], model: str | None = None,
            check: bool = False) -> None:
    """Serve the lab page until interrupted. `model` (a source lmlab.load reads) starts loading at once, on a
    thread: the page shows its progress. `check`: validate everything, load `model` here, and return."""
    import uvicorn

    from lmlab.serve.lab import create_lab_app

    app = create_lab_app(cfg, load_settings)  # checks the folders and the load settings
    if model is not None and check:
        app.state.loads.load_now(model)
    elif model is not None:
        app.state.loads.start(model)  # refuses an unknown name at once; the rest is on the page
    check_address(cfg)
    where = f"http://{cfg.host}:{cfg.port}"
    if check:
        print(f"lmlab lab: the runs in {app.state.runs} would be shown at {where} (--check: not started)")
        return
    print(f"lmlab lab: the runs in {app.state.runs} at {where}{'; API key required' if cfg.api_key else ''}",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=2)
