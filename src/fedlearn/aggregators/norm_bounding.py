"""Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?")."""
from __future__ import annotations

import numpy as np

from ..strategies.fedavg import RunningWeightedMean, weighted_mean
from ._checks import check_stack


def clip_rows(deltas: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale every row with a norm above `max_norm` down to exactly `max_norm`."""
    norms = np.linalg.norm(deltas, axis=1)
    scale = np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(float).tiny))
    return deltas * scale[:, None]


class NormBounding:
    """Clip every update to norm `max_norm`, then take the example-weighted mean.

    It bounds no number of Byzantine clients: it caps how far each one can pull, so boosted updates
    (model replacement, scaled sign flips) lose their leverage while honest updates pass unchanged.
    `max_norm=None` clips to the median norm of the round, which honest clients set while f < n/2; that
    needs every update at once, while a fixed `max_norm` folds each clipped update into a running mean.
    The weights are the example counts clients report; where those are untrusted, an attacker can inflate
    its count, so prefer a weight-free aggregator there.
    """

    name = "norm_bounding"
    min_updates = 1

    def __init__(self, max_norm: float | None = None) -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"norm bound max_norm must be > 0 (or omitted for the round's median norm), "
                             f"got {max_norm}")
        self.max_norm = max_norm

    @property
    def streams(self) -> bool:
        """A fixed bound clips each update on its own; the round's median norm needs them all."""
        return self.max_norm is not None

    def start(self) -> "ClippedRunningMean":
        if self.max_norm is None:
            raise ValueError("norm bounding to the round's median norm needs every update at once; set max_norm "
                             "to fold updates one by one")
        return ClippedRunningMean(self.max_norm)

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        bound = float(np.median(np.linalg.norm(deltas, axis=1))) if self.max_norm is None else self.max_norm
        return weighted_mean(clip_rows(deltas, bound), weights)


class ClippedRunningMean(RunningWeightedMean):
    """The weighted mean of updates each clipped to norm `max_norm`, folded one at a time."""

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        self.max_norm = max_norm

    def add(self, delta: np.ndarray, weight: float) -> None:
        super().add(clip_rows(delta[None, :], self.max_norm)[0], weight)
