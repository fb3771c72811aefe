"""Live progress for a run: a rich progress bar with round, train loss and test accuracy."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .server.store import RoundRecord


class RoundProgress:
    """Context manager; call it with each committed `RoundRecord`."""

    def __init__(self, total_rounds: int, start_round: int = 0, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
        )
        self.task = self.progress.add_task("rounds", total=total_rounds, completed=start_round, status="")

    def __enter__(self) -> "RoundProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, record: RoundRecord) -> None:
        m = record.metrics
        parts = [f"loss {m['train_loss']:.4f}" if "train_loss" in m else "",
                 f"acc {m['test_accuracy']:.4f}" if "test_accuracy" in m else "",
                 f"backdoor {m['test_backdoor_success']:.2f}" if "test_backdoor_success" in m else "",
                 f"failed {int(m['clients_failed'])}" if m.get("clients_failed") else "",
                 f"flagged {int(m['clients_flagged'])}" if m.get("clients_flagged") else "",
                 f"eps {m['dp_epsilon']:.2f}" if "dp_epsilon" in m else ""]
        self.progress.update(self.task, completed=record.round, status="  ".join(p for p in parts if p))
