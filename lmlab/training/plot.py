"""Training curves: train and val loss of one or more runs, against step and against wall time."""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.training.metrics import read_events


def read_evals(run: str | Path) -> list[dict]:
    """The eval events of a run (one still training, or killed mid-append, may end in a torn line: dropped)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise LmlabError(f"{run} has no metrics.jsonl; give run directories written by lmlab train")
    return [e for e in read_events(path) if e.get("event") == "eval"]


def plot_runs(runs: list[str], out: str | Path, title: str | None = None) -> Path:
    """One PNG, two panels (loss vs step, loss vs seconds); solid val, dashed train, a colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LmlabError(f"--out {out}: give a .png, .svg or .pdf file name")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, run in enumerate(runs):
        evals = read_evals(run)
        if not evals:
            raise LmlabError(f"{run} has no evaluations yet; nothing to plot")
        color = f"C{i % 10}"
        for ax, x in zip(axes, ("step", "elapsed_s"), strict=True):
            xs = [e[x] for e in evals]
            ax.plot(xs, [e["val_loss"] for e in evals], color=color, label=f"{Path(run).name} val")
            ax.plot(xs, [e["train_loss"] for e in evals], color=color, ls="--", alpha=0.7,
                    label=f"{Path(run).name} train")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time (s)")
    axes[0].set_ylabel("loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "train (dashed) and val (solid) loss")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
