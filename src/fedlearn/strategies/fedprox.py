"""FedProx (Li et al. 2020): FedAvg whose clients add mu/2 * ||w - w_global||^2 to their local objective,
and whose server accepts the partial work of stragglers instead of dropping it."""
from __future__ import annotations

from .base import Strategy
from .fedavg import ServerSGD, weighted_mean


class FedProx(Strategy):
    """Proximal local objective (strength `mu`) + weighted mean + server SGD; partial work accepted."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        super().__init__(weighted_mean, ServerSGD(server_lr), client_config={"proximal_mu": mu}, accept_partial=True)
