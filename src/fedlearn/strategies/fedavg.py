"""FedAvg (McMahan et al. 2017): example-weighted mean of client deltas, applied with a server learning rate."""
from __future__ import annotations

import numpy as np

from .base import Strategy


class RunningWeightedMean:
    """The example-weighted mean, folded one update at a time: O(d) memory however many clients report.

    mean += (w_k / W_k) * (delta_k - mean) with W_k the weight so far (West 1979): the same mean as the
    stacked computation up to float rounding, and exactly the update itself when one client reports.
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.weight = 0.0

    def add(self, delta: np.ndarray, weight: float) -> None:
        if self.mean is None:
            self.mean = np.zeros(delta.shape, dtype=np.float64)
        elif delta.shape != self.mean.shape:
            raise ValueError(f"update of shape {delta.shape} does not match the running mean's {self.mean.shape}")
        if weight < 0:
            raise ValueError(f"example weights must be >= 0, got {weight}")
        self.weight += float(weight)
        if weight > 0:
            step = delta - self.mean
            step *= float(weight) / self.weight
            self.mean += step

    def result(self) -> np.ndarray:
        if self.mean is None or self.weight <= 0:
            raise ValueError("weighted mean needs a positive total weight (did every client report 0 examples?)")
        return self.mean


class WeightedMean:
    """sum_k w_k * delta_k / sum_k w_k: over a stacked `(n, d)` array when called, or folded update by update
    through `start()` (`streams` is True: the round loop then never holds more than one update)."""

    __name__ = "weighted_mean"
    streams = True

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        total = weights.sum()
        if total <= 0:
            raise ValueError("weighted mean needs a positive total weight (did every client report 0 examples?)")
        return (weights / total) @ deltas

    def start(self) -> RunningWeightedMean:
        return RunningWeightedMean()


weighted_mean = WeightedMean()


class ServerSGD:
    """x <- x + lr * delta. With lr = 1 this is plain FedAvg; other values damp or amplify the step."""

    def __init__(self, lr: float = 1.0) -> None:
        if lr <= 0:
            raise ValueError(f"server learning rate must be positive, got {lr}")
        self.lr = lr

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return params + self.lr * delta

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass


class FedAvg(Strategy):
    """Weighted mean + server SGD. Stragglers' partial work is dropped, as in the original algorithm."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__(weighted_mean, ServerSGD(server_lr))
