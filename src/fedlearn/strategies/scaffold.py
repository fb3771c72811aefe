"""SCAFFOLD (Karimireddy et al. 2020): control variates correct the client drift that many local steps on
heterogeneous data cause, so the global model converges to the optimum of the whole federation rather than
to a point pulled toward the clients' own optima.

Client i has a control variate c_i (an estimate of its own gradient); the server's c is their mean. Every
local step uses g_i(y) - c_i + c instead of g_i(y). In simulation, clients are created per task and dropped,
so every c_i lives here, on the server: the strategy sends c - c_i as the ``gradient_correction`` config
key, and the client sends back its new c_i (the mean uncorrected gradient of its local steps, option II of
the paper) as ``extras["mean_gradient"]`` of its update. Only clients that have taken part are stored, in
one stacked array, and `state_dict` includes them, so a resumed run keeps every c_i.

c is the example-weighted mean of the stored c_i, so SCAFFOLD minimises the same example-weighted objective
as FedAvg. Clients not yet seen do not count towards c (the paper counts them as zeros); the two agree once
every client has taken part.
"""
from __future__ import annotations

import json

import numpy as np

from ..types import Config, Update
from .base import Strategy
from .fedavg import ServerSGD, weighted_mean

CORRECTION_KEY = "gradient_correction"
CONTROL_KEY = "mean_gradient"
_STATE = "scaffold/"


class Scaffold(Strategy):
    """Drift-corrected local SGD + weighted mean + server SGD with `server_lr` (the paper's global step)."""

    name = "scaffold"
    client_extras = (CONTROL_KEY,)

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__(weighted_mean, ServerSGD(server_lr))
        self._set_controls([], np.zeros((0, 0)), np.zeros(0))

    def _set_controls(self, client_ids: list[str], controls: np.ndarray, weights: np.ndarray) -> None:
        """Install the stored c_i: rows of `controls`, with example weights `weights`."""
        if controls.shape[0] != len(client_ids) or weights.shape != (len(client_ids),):
            raise ValueError(f"SCAFFOLD state is inconsistent: {len(client_ids)} client ids, "
                             f"controls of shape {controls.shape}, weights of shape {weights.shape}")
        self.client_ids = client_ids
        self.rows = {cid: i for i, cid in enumerate(client_ids)}
        self.controls, self.weights = controls, weights
        self._server_control: np.ndarray | None = None

    @property
    def server_control(self) -> np.ndarray | None:
        """c: the example-weighted mean of the stored c_i (None before any client has reported)."""
        if self._server_control is None and self.client_ids:
            self._server_control = weighted_mean(self.controls, self.weights)
        return self._server_control

    def correction(self, client_id: str) -> np.ndarray | float:
        """c - c_i for one client (c_i = 0 for a new client); the scalar 0.0 before any client has reported."""
        if self.server_control is None:
            return 0.0
        row = self.rows.get(client_id)
        return self.server_control if row is None else self.server_control - self.controls[row]

    def configure_fit(self, rnd: int, client_id: str) -> Config:
        return {**super().configure_fit(rnd, client_id), CORRECTION_KEY: self.correction(client_id)}

    def aggregate(self, updates: list[Update]) -> np.ndarray:
        """Store the participants' new c_i (so c moves too), then average their deltas."""
        missing = [u.client_id for u in updates if CONTROL_KEY not in u.extras]
        if missing:
            raise ValueError(
                f"SCAFFOLD needs every update to carry extras[{CONTROL_KEY!r}], but clients {missing[:5]} sent "
                f"none; use clients that honour the {CORRECTION_KEY!r} config key (as TorchClient does)"
            )
        new = [u.client_id for u in updates if u.client_id not in self.rows]
        if new:  # the table grows only when clients take part for the first time
            d = updates[0].delta.shape[0]
            self._set_controls(self.client_ids + new,
                               np.concatenate([self.controls.reshape(-1, d), np.zeros((len(new), d))]),
                               np.concatenate([self.weights, np.zeros(len(new))]))
        rows = [self.rows[u.client_id] for u in updates]
        self.controls[rows] = np.stack([u.extras[CONTROL_KEY] for u in updates])
        self.weights[rows] = [u.num_examples for u in updates]
        self._server_control = None
        return super().aggregate(updates)

    def state_dict(self) -> dict[str, np.ndarray]:
        ids = np.frombuffer(json.dumps(self.client_ids).encode(), dtype=np.uint8)
        return {**super().state_dict(), f"{_STATE}client_ids": ids, f"{_STATE}controls": self.controls,
                f"{_STATE}weights": self.weights}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state)
        raw_ids = state.get(f"{_STATE}client_ids", np.zeros(0, dtype=np.uint8))
        client_ids = json.loads(bytes(raw_ids).decode()) if raw_ids.size else []
        self._set_controls(client_ids, state.get(f"{_STATE}controls", np.zeros((0, 0))),
                           state.get(f"{_STATE}weights", np.zeros(0)))
