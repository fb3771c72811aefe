"""Run a task with a time limit in this process, so a stalled simulated client cannot hang a round."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_with_deadline(task: Callable[[], T], deadline: float | None) -> T:
    """`task()`, or `TimeoutError` after `deadline` seconds (the task is abandoned in a daemon thread)."""
    if deadline is None:
        return task()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = task()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise TimeoutError(f"no answer within the stage deadline of {deadline:g}s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
