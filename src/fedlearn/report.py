"""Run outputs besides the store: metrics as CSV and a PNG plot of every evaluation metric per round."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from .server.store import RoundRecord

_PER_CLASS = re.compile(r"(test|fed)_(recall|precision)_\d+$")


def write_csv(records: list[RoundRecord], path: Path) -> None:
    """One row per round: the round, its wall-clock seconds, then one column per metric (names as in
    `fedlearn.metrics`)."""
    keys = sorted({k for r in records for k in r.metrics})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["round", "seconds", *keys])
        for r in records:
            writer.writerow([r.round, f"{r.seconds:.3f}", *(r.metrics.get(k, "") for k in keys)])


def plotted_metrics(records: list[RoundRecord]) -> dict[str, list[str]]:
    """Panel title -> metric names: accuracy, loss, and every other evaluation metric (the built-in AUC, F1,
    balanced accuracy and any metric of the user's own evaluation; per-class entries are left to the CSV)."""
    names = sorted({k for r in records for k in r.metrics})
    evaluated = [k for k in names if k.startswith(("test_", "fed_")) and not _PER_CLASS.match(k)]
    panels = {"accuracy": [k for k in evaluated if k.endswith("_accuracy") and "balanced" not in k],
              "loss": [k for k in ("train_loss", *evaluated) if k.endswith("loss") and k in names]}
    others = [k for k in evaluated if k not in panels["accuracy"] and k not in panels["loss"]]
    if others:
        panels["other metrics"] = others
    return {title: keys for title, keys in panels.items() if keys}


def plot(records: list[RoundRecord], path: Path) -> None:
    """One panel each for accuracy, loss and the other evaluation metrics, per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    panels = plotted_metrics(records) or {"loss": []}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            ax.plot(rounds, [r.metrics.get(key, float("nan")) for r in records], label=key)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
