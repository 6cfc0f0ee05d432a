"""The studies' small PNGs (matplotlib's Agg backend, 100 dpi, a few inches: each well under 100 KB).
Loss curves of whole runs are lmlab.training.plot's; these are the study-specific views: curves from summaries (by step
or by wall time), grouped bars, and a labelled scatter."""

from __future__ import annotations

from pathlib import Path

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    fig.clf()
    return out


def curves(summaries: dict[str, dict], out: Path, title: str, x: str = "step", train: bool = True) -> Path:
    """Val loss (solid) and train loss (dashed) of each run against `x` ("step" or "elapsed_s")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, s) in enumerate(summaries.items()):
        c = s["curve"]
        ax.plot(c[x], c["val"], color=f"C{i % 10}", label=label, lw=1.2)
        if train:
            ax.plot(c[x], c["train"], color=f"C{i % 10}", ls="--", lw=0.8, alpha=0.7)
    ax.set_xlabel("step" if x == "step" else "wall time (s)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title + (" (dashed: train)" if train else ""), fontsize=9)
    out = _save(fig, out)
    plt.close(fig)
    return out


def bars(groups: list[str], series: dict[str, list[float]], out: Path, title: str, ylabel: str) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name, color=f"C{i % 10}")
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    out = _save(fig, out)
    plt.close(fig)
    return out


def scatter(points: dict[str, tuple[float, float]], out: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """One labelled point per entry."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], color=f"C{i % 10}", s=25)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    out = _save(fig, out)
    plt.close(fig)
    return out


def lines(series: dict[str, tuple[list[float], list[float]]], out: Path, title: str, xlabel: str, ylabel: str,
          logx: bool = False) -> Path:
    """One marked line per entry, (xs, ys): a quantity against a setting (val loss against lr, or tokens seen)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=f"C{i % 10}", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    out = _save(fig, out)
    plt.close(fig)
    return out
