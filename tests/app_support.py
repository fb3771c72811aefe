"""A user's task written once as an app, for the tests that run it in every front door (`--app
app_support:make_app`, `[app] factory = "app_support:make_app"`, `run_simulation(app=...)`)."""
from __future__ import annotations

import torch

from fedlearn import App
from fedlearn.data import federate, load_digits


def digits_model(hidden: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def make_app(num_clients: int = 4, hidden: int = 32, strategy: str = "fedavg") -> App:
    """Digits over `num_clients` IID clients (ids "0".."n-1"), an MLP with `hidden` units, one local epoch."""
    data = federate(load_digits(seed=0), "iid", num_clients, seed=0)
    return App.from_data(data, lambda: digits_model(hidden), strategy=strategy,
                         fit_config={"local_epochs": 1, "batch_size": 16, "lr": 0.1})
