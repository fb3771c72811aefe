"""The `Transform` interface."""
from __future__ import annotations

import numpy as np

from ..types import Config, Failure, Update


class Transform:
    """Identity by default; override the halves you need.

    - `client`: runs on the client after `fit`, before the update leaves it (clip, local noise, compress, mask).
    - `server`: runs on the server on the validated updates, before aggregation (decode, filter); may refuse
      updates by returning them as `Failure`s with a reason.
    - `finalize`: runs on the aggregated delta (central DP noise, unmasking corrections).
    """

    name = "transform"

    def client(self, update: Update, config: Config) -> Update:
        return update

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        return updates, []

    def finalize(self, delta: np.ndarray, updates: list[Update], rnd: int) -> np.ndarray:
        return delta
