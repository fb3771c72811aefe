"""FedAvg (McMahan et al. 2017): example-weighted mean of client deltas, applied with a server learning rate."""
from __future__ import annotations

import numpy as np

from .base import Strategy


def weighted_mean(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k * delta_k / sum_k w_k over the stacked `(n, d)` deltas."""
    total = weights.sum()
    if total <= 0:
        raise ValueError("weighted mean needs a positive total weight (did every client report 0 examples?)")
    return (weights / total) @ deltas


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
