"""Run outputs besides the store: metrics as CSV and a PNG plot of accuracy and loss per round."""
from __future__ import annotations

import csv
from pathlib import Path

from .server.store import RoundRecord


def write_csv(records: list[RoundRecord], path: Path) -> None:
    """One row per round, one column per metric."""
    keys = sorted({k for r in records for k in r.metrics})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["round", *keys])
        for r in records:
            writer.writerow([r.round, *(r.metrics.get(k, "") for k in keys)])


def plot(records: list[RoundRecord], path: Path) -> None:
    """Accuracy (left) and loss (right) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("test_accuracy", "fed_accuracy"):
        if any(key in r.metrics for r in records):
            ax_acc.plot(rounds, [r.metrics.get(key, float("nan")) for r in records], label=key)
    for key in ("train_loss", "test_loss", "fed_loss"):
        if any(key in r.metrics for r in records):
            ax_loss.plot(rounds, [r.metrics.get(key, float("nan")) for r in records], label=key)
    for ax, title in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
