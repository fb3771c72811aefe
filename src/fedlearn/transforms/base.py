"""The `Transform` interface."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..types import Config, Failure, Metrics, Update


class StopRun(Exception):
    """Raised from a round-level hook to end the run cleanly after the last committed round (for example,
    a spent privacy budget); the message says why."""


class Transform:
    """Identity by default; override the halves you need.

    - `client`: runs on the client after `fit`, before the update leaves it (clip, local noise, compress, mask).
    - `server`: runs on the server on the validated updates, before aggregation (decode, filter); may refuse
      updates by returning them as `Failure`s with a reason.
    - `finalize`: runs on the aggregated delta (central DP noise, unmasking corrections).

    Round-level hooks, for transforms with server-side state (a privacy accountant, an adaptive clip norm):
    `configure` adds settings sent to every sampled client (and may stop the run by raising `StopRun`),
    `report` adds metrics to the round's record, `restore` rebuilds state from the stored rounds on resume.
    `check_chain` refuses, when a driver is built, a chain of transforms or a round protocol it cannot run with.
    """

    name = "transform"
    # True when `server` judges each update on its own and `finalize` reads no update's `delta` (only its count,
    # weight and metrics): the round loop may then stream, folding each update into a running aggregate as it
    # arrives and handing `finalize` the accepted updates with their deltas already folded (empty arrays).
    per_update = False
    # False when `client` keeps nothing between calls, so a copy of this transform in a worker process acts as the
    # original would: pools may then run protocol stages that train (and run the client halves) in their workers.
    stateful_client = True

    def client(self, update: Update, config: Config) -> Update:
        return update

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        return updates, []

    def finalize(self, delta: np.ndarray, updates: list[Update], rnd: int) -> np.ndarray:
        return delta

    def configure(self, rnd: int) -> Config:
        return {}

    def report(self, rnd: int) -> Metrics:
        return {}

    def check_chain(self, chain: Sequence["Transform"], protocol: Any) -> None:
        """Raise `ValueError` with the reason if this transform cannot run in `chain` under `protocol`."""

    def restore(self, rounds: list) -> None:
        """Rebuild server-side state from the committed `RoundRecord`s of a resumed run."""


def runs_in_copies(chain: Sequence[Transform]) -> bool:
    """True when every client half in `chain` is the identity or keeps no state (see `stateful_client`)."""
    return all(type(t).client is Transform.client or not t.stateful_client for t in chain)
