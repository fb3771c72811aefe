"""Sample-level DP on clients: DP-SGD through Opacus (optional extra ``fedlearn[dpsgd]``).

Each client trains with per-example gradient clipping and Gaussian noise over Poisson-sampled batches;
its epsilon covers every step it has ever taken (kept in `ledger`, which on a device persists with the
client) and is reported with each update as the ``dpsgd_epsilon`` metric. This protects each training
example of a client, not the client's participation as a whole (use central DP for that).
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..params import Layout
from ..torch import TorchClient, load_state, state_of
from ..types import Config, State, Update
from .accountant import SampledGaussian

EPSILON_KEY = "dpsgd_epsilon"


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ImportError("DP-SGD on clients needs Opacus: pip install 'fedlearn[dpsgd]'") from None
    return opacus


class DPSGDClient(TorchClient):
    """A `TorchClient` whose local training is DP-SGD with `noise_multiplier` and per-example clip norm
    `max_grad_norm`; epsilon at `delta` by RDP over all the client's steps so far (counted in `ledger`)."""

    def __init__(self, *args: Any, noise_multiplier: float, max_grad_norm: float, delta: float,
                 ledger: MutableMapping[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if noise_multiplier <= 0 or max_grad_norm <= 0:
            raise ValueError("DP-SGD needs a positive noise multiplier and clip norm")
        self.noise_multiplier, self.max_grad_norm, self.delta = noise_multiplier, max_grad_norm, delta
        self.ledger = ledger if ledger is not None else {}

    def fit(self, state: State, config: Config) -> Update:
        opacus = _opacus()
        opts = {**self.defaults, **{k: config[k] for k in self.defaults if k in config}}
        model = self.model_fn()
        load_state(model, state)
        batch = min(int(opts["batch_size"]), len(self.x))
        loader = DataLoader(TensorDataset(self.x, self.y), batch_size=batch,
                            generator=torch.Generator().manual_seed(int(config.get("seed", 0))))
        optimizer = torch.optim.SGD(model.parameters(), lr=float(opts["lr"]), momentum=float(opts["momentum"]))
        wrapped, dp_optimizer, dp_loader = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=True)
        wrapped.train()
        losses: list[float] = []
        for _ in range(int(opts["local_epochs"])):
            for xb, yb in dp_loader:
                dp_optimizer.zero_grad()
                loss = self.loss_fn(wrapped(xb), yb)
                loss.backward()
                dp_optimizer.step()
                losses.append(float(loss.detach()))
        steps = int(opts["local_epochs"]) * len(dp_loader)
        self.ledger[self.cid] = self.ledger.get(self.cid, 0) + steps
        mechanism = SampledGaussian(self.noise_multiplier, len(self.x), batch, "poisson")
        epsilon = mechanism.epsilon(self.ledger[self.cid], self.delta)
        layout = Layout.of(state)
        delta = layout.flatten(state_of(model)) - layout.flatten(state)
        metrics = {"train_loss": sum(losses) / max(1, len(losses)), "steps": float(steps), EPSILON_KEY: epsilon}
        return Update(self.cid, int(config.get("round", 0)), delta, len(self.x), metrics)
