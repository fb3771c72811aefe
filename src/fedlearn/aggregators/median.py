"""Coordinate-wise median (Yin et al. 2018)."""
from __future__ import annotations

import numpy as np

from ._checks import check_stack


class CoordinateMedian:
    """Per coordinate, the median of the n client values; example weights are ignored.

    Tolerates f < n/2 Byzantine clients: as long as honest clients are a strict majority, every output
    coordinate lies between two honest values. Its error grows with the spread of honest updates, so
    strong non-IID data costs accuracy even without attackers.
    """

    name = "median"
    streams = False  # needs every update of the round at once: the round loop keeps the stack
    min_updates = 1

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        return np.median(deltas, axis=0)
