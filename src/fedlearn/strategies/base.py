"""A strategy is three plug-ins: what clients are told (client algorithm), how updates are combined
(aggregator), and how the combined update moves the global model (server optimizer).

Updates arrive as a stacked `(n_clients, d)` float64 array with per-client weights, so an aggregator is a
few vectorised numpy lines. Strategies that keep state across rounds (server momentum, control variates)
expose it through `state_dict` so the run store can save it with each round and resume exactly.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..types import Config, Update


class Aggregator(Protocol):
    """Combine stacked client deltas `(n, d)` with example weights `(n,)` into one `(d,)` delta."""

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray: ...


class ServerOptimizer(Protocol):
    """Move the flat global model given the aggregated delta (a negative pseudo-gradient)."""

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class Strategy:
    """Client algorithm + aggregator + server optimizer. Subclasses set these; the round loop calls:

    `configure_fit` per sampled client, `update_problem` on each result, `aggregate` on the accepted updates,
    then `apply`.
    `accept_partial` decides whether stragglers' partial work is used (FedProx) or dropped (FedAvg).
    `client_extras` names the `Update.extras` its clients must upload besides the delta (SCAFFOLD's control
    variates); privacy features protect only the delta, so they refuse strategies that need extras.
    """

    name = "strategy"
    takes_aggregator = True  # False where `aggregate` has its own rule and ignores `self.aggregator`
    client_extras: tuple[str, ...] = ()

    def __init__(
        self,
        aggregator: Aggregator,
        server_optimizer: ServerOptimizer,
        *,
        client_config: Config | None = None,
        accept_partial: bool = False,
    ) -> None:
        self.aggregator = aggregator
        self.server_optimizer = server_optimizer
        self.client_config = dict(client_config or {})
        self.accept_partial = accept_partial

    def configure_fit(self, rnd: int, client_id: str) -> Config:
        """Instructions for one sampled client this round."""
        return dict(self.client_config)

    def update_problem(self, update: Update) -> str | None:
        """Why this strategy cannot use `update` (a value it needs is missing or out of range), or None.
        The round loop rejects such an update as that client's failure before `aggregate` sees it."""
        return None

    def begin_round(self, rnd: int, params: np.ndarray) -> None:
        """Called by the round loop with the flat model the round starts from; hands it to an aggregator
        that needs it (FLTrust trains on its root data from it)."""
        hook = getattr(self.aggregator, "begin_round", None)
        if hook is not None:
            hook(params)

    def aggregate(self, updates: list[Update]) -> np.ndarray:
        """Stack the accepted updates and combine them."""
        deltas = np.stack([u.delta for u in updates])
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        return self.aggregator(deltas, weights)

    def apply(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New flat global model."""
        return self.server_optimizer.step(params, delta)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume this strategy exactly (saved with every committed round)."""
        state = {f"server_opt/{k}": v for k, v in self.server_optimizer.state_dict().items()}
        if hasattr(self.aggregator, "state_dict"):  # stateful aggregators, e.g. centered clipping's center
            state.update({f"aggregator/{k}": v for k, v in self.aggregator.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.server_optimizer.load_state_dict(_under(state, "server_opt/"))
        if hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(_under(state, "aggregator/"))


def _under(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries of `state` whose keys start with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
