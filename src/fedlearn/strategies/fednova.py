"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization"): normalised averaging for clients that take different numbers of local steps.

A client that takes more steps moves further, so FedAvg's plain mean of deltas quietly optimises an
objective in which such clients weigh more, and converges to the wrong point. In this framework that
happens whenever clients hold different amounts of data (steps = epochs * batches), and whenever stragglers
finish part of their work. FedNova divides each delta by the client's step count a_i, averages the
per-step directions with the example weights p_i, and rescales by the effective step count
tau_eff = sum_i p_i a_i:

    Δ = tau_eff * sum_i p_i * Δ_i / a_i

so every client counts by its data, whatever its amount of work, and partial work is used, not dropped.
The step count is read from the update's ``steps`` metric, which `TorchClient` reports. It is the client's
own claim: a client that under-reports its steps gains weight, so combine FedNova with norm bounding
where clients are not trusted.
"""
from __future__ import annotations

import numpy as np

from ..types import Update
from .base import Strategy
from .fedavg import ServerSGD, weighted_mean

STEPS_METRIC = "steps"


def normalized_mean(deltas: np.ndarray, weights: np.ndarray, work: np.ndarray) -> np.ndarray:
    """tau_eff * sum_k p_k * delta_k / work_k with p = weights / sum(weights) and tau_eff = p @ work."""
    p = weights / weights.sum()
    return float(p @ work) * ((p / work) @ deltas)


def local_work(steps: np.ndarray, momentum: float = 0.0) -> np.ndarray:
    """a_i: how far `steps` local SGD steps move along a constant gradient, in units of lr * gradient.

    Plain SGD: a_i = steps. With heavy-ball momentum rho the k-th step moves (1 - rho^k) / (1 - rho), so
    a_i = (steps - rho * (1 - rho^steps) / (1 - rho)) / (1 - rho), the paper's normaliser for momentum.
    """
    if momentum == 0.0:
        return steps
    return (steps - momentum * (1.0 - momentum**steps) / (1.0 - momentum)) / (1.0 - momentum)


class FedNova(Strategy):
    """Normalised averaging + server SGD; partial work of stragglers is accepted.

    `local_momentum` must equal the clients' SGD momentum (0 for plain SGD) for the normalisation to be right.
    """

    name = "fednova"
    takes_aggregator = False  # the normalised mean is the rule; a robust aggregator would be ignored

    def __init__(self, server_lr: float = 1.0, local_momentum: float = 0.0) -> None:
        if not 0.0 <= local_momentum < 1.0:
            raise ValueError(f"local_momentum must be in [0, 1), got {local_momentum}")
        super().__init__(weighted_mean, ServerSGD(server_lr), accept_partial=True)
        self.local_momentum = local_momentum

    def update_problem(self, update: Update) -> str | None:
        steps = update.metrics.get(STEPS_METRIC)
        if not (isinstance(steps, (int, float)) and np.isfinite(steps) and steps >= 1):
            return (f"FedNova needs metrics[{STEPS_METRIC!r}] (local steps taken, >= 1), got {steps!r}; report it "
                    "from Client.fit (TorchClient does)")
        return None

    def aggregate(self, updates: list[Update]) -> np.ndarray:
        problems = {u.client_id: p for u in updates if (p := self.update_problem(u)) is not None}
        if problems:
            cid, problem = next(iter(problems.items()))
            raise ValueError(f"FedNova cannot use the updates of clients {list(problems)[:5]}: client {cid}: {problem}")
        steps = np.array([u.metrics[STEPS_METRIC] for u in updates], dtype=np.float64)
        deltas = np.stack([u.delta for u in updates])
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        return normalized_mean(deltas, weights, local_work(steps, self.local_momentum))
