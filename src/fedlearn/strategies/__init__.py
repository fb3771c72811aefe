"""Strategies: client algorithm + aggregator + server optimizer, selectable by name."""
from __future__ import annotations

from typing import Any

from .base import Aggregator, ServerOptimizer, Strategy
from .fedavg import FedAvg, ServerSGD, weighted_mean
from .fednova import FedNova
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from .fedprox import FedProx
from .scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam,
                                         "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "scaffold": Scaffold,
                                         "fednova": FedNova}


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by its registered name with keyword parameters (e.g. mu=1.0)."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for strategy {name!r}: {exc}") from None


__all__ = ["Strategy", "Aggregator", "ServerOptimizer", "FedAvg", "FedProx", "ServerSGD", "weighted_mean",
           "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Scaffold", "FedNova", "STRATEGIES", "make_strategy"]
