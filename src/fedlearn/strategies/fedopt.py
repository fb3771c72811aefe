"""FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization"): the averaged client delta is treated as a
negative pseudo-gradient, and the server moves the model with an optimizer instead of plain SGD: momentum
(FedAvgM, Hsu et al. 2019) or an adaptive method (FedAdagrad, FedAdam, FedYogi). Clients run plain local SGD.

Every optimizer works on the whole flat model vector at once; its moment vectors are created on the first
step and saved by `state_dict`, so a resumed run continues with the same moments.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .base import Strategy
from .fedavg import weighted_mean


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


class ServerMomentum:
    """FedAvgM's server step: v <- momentum * v + delta; x <- x + lr * v (v starts at zero)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        _check_positive("server learning rate", lr)
        _check_range("server momentum", momentum, 0.0, 1.0)
        self.lr, self.momentum = lr, momentum
        self.velocity: np.ndarray | None = None

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        self.velocity = delta.copy() if self.velocity is None else self.momentum * self.velocity + delta
        return params + self.lr * self.velocity

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = state.get("velocity")


class AdaptiveServerOptimizer(ABC):
    """Algorithm 2 of Reddi et al.: with Δ the aggregated delta,

        m <- beta1 * m + (1 - beta1) * Δ;   v <- second_moment(v, Δ²);   x <- x + lr * m / (sqrt(v) + tau)

    with m starting at 0 and v at tau² (the paper's v_{-1} >= tau²), and no bias correction, as in the paper.
    `tau` bounds how far one coordinate can move when its updates are tiny: smaller tau, more adaptivity.
    """

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        _check_positive("server learning rate", lr)
        _check_positive("tau", tau)
        _check_range("beta1", beta1, 0.0, 1.0)
        _check_range("beta2", beta2, 0.0, 1.0)
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """The new second-moment estimate: the one line in which Adagrad, Adam and Yogi differ."""

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros_like(delta), np.full_like(delta, self.tau**2)
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * delta
        self.v = self.second_moment(self.v, delta * delta)
        return params + self.lr * self.m / (np.sqrt(self.v) + self.tau)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


class ServerAdagrad(AdaptiveServerOptimizer):
    """v <- v + Δ² (beta2 is not used)."""

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq


class ServerAdam(AdaptiveServerOptimizer):
    """v <- beta2 * v + (1 - beta2) * Δ²."""

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class ServerYogi(AdaptiveServerOptimizer):
    """v <- v - (1 - beta2) * Δ² * sign(v - Δ²): like Adam, but v grows fast and shrinks slowly."""

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)


class FedAvgM(Strategy):
    """Weighted mean + server momentum: damps the round-to-round noise of partial participation."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(weighted_mean, ServerMomentum(server_lr, momentum))


class _AdamLike(Strategy):
    """Weighted mean + an adaptive server optimizer with both moment decays (the paper's defaults)."""

    optimizer: type[AdaptiveServerOptimizer]

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(weighted_mean, self.optimizer(server_lr, beta1, beta2, tau))


class FedAdam(_AdamLike):
    """Weighted mean + Adam on the server."""

    name = "fedadam"
    optimizer = ServerAdam


class FedYogi(_AdamLike):
    """Weighted mean + Yogi on the server; more stable than FedAdam when update sizes vary a lot."""

    name = "fedyogi"
    optimizer = ServerYogi


class FedAdagrad(Strategy):
    """Weighted mean + Adagrad on the server: per-coordinate steps that only ever shrink."""

    name = "fedadagrad"

    def __init__(self, server_lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(weighted_mean, ServerAdagrad(server_lr, beta1, tau=tau))
