"""Curves of a federated run: per-node held-out metric and fold weights against global version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.federated.tasks import METRIC


def plot_run(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ups = [r for r in history if r.get("event") == "update" and r.get("task")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for task in sorted({r["task"] for r in ups}):
        key = f"eval_{METRIC[task]}"
        pts = [(r["step"], r[key]) for r in ups if r["task"] == task and r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), marker=".", label=f"{task} held-out {METRIC[task]}")
        wts = [(r["step"], r["weight"]) for r in ups if r["task"] == task and r.get("weight") is not None]
        if wts:
            axes[1].plot(*zip(*wts), marker=".", label=task)
    axes[0].set(xlabel="global version (folds)", ylabel="metric (acc: higher, kl: lower)", title="node held-out metrics")
    axes[1].set(xlabel="global version (folds)", ylabel="fold weight w", title="aggregation weights")
    for ax in axes:
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
