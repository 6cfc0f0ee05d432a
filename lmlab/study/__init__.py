"""`lmlab study NAME`: experiments built in, each answering one question with real runs, plots and a report.

    dropout-vs-topk   why dropout, if top-k sampling already adds randomness? (lmlab/study/dropout_topk.py)
    dropout           dropout rates, schedules and sites against overfitting (lmlab/study/dropout.py)
    sampling          what each decoding strategy does to diversity and log-probability (lmlab/study/sampling.py)
    optimizers        SGD to Muon at their best lr; batch size, init, L-BFGS (lmlab/study/optimizers.py)

Each writes OUT/results.json (`{"study": NAME, "cells": [...], "findings": {...}}`, every finding a boolean
computed from numbers in the same file), OUT/report.md (its conclusion written from those numbers) and small PNGs,
and resumes where an interrupted invocation stopped (lmlab/study/core.py).
"""

from __future__ import annotations

from pathlib import Path

from lmlab.data.tokens import TokenData
from lmlab.errors import LmlabError, unknown
from lmlab.study import dropout, dropout_topk, optimizers, sampling
from lmlab.study.core import Context, check_args, claim_out

STUDIES = {m.NAME: m for m in (dropout_topk, dropout, sampling, optimizers)}


def run_study(name: str, out: str | Path, scale: str = "default", data: str | Path | None = None,
              model: str | None = None, device: str = "auto", steps: int | None = None, quiet: bool = False) -> dict:
    """Run (or resume) the study `name` into `out`; its results dict (also written to OUT/results.json)."""
    if name not in STUDIES:
        raise unknown("study", name, STUDIES)
    check_args(scale, steps, device)
    out = Path(out)
    claim = {"study": name, "scale": scale, "steps": steps, "data": None if data is None else str(Path(data).resolve()),
             "model": model}
    ctx = Context(name, out, scale, device, claim["data"], steps, quiet, model)
    if model is not None and not hasattr(STUDIES[name], "check_model"):
        raise LmlabError(f"--model is for the sampling study; {name!r} trains its own models")
    if data is not None:
        TokenData(data)  # a clear error for a directory that is not prepared data, before --out is claimed
    if hasattr(STUDIES[name], "check_model"):
        ctx.loaded = STUDIES[name].check_model(ctx)  # a model that cannot be loaded: refused before --out is claimed
    claim_out(out, claim)
    return STUDIES[name].run(ctx)
