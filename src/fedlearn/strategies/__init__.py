"""Strategies: client algorithm + aggregator + server optimizer, selectable by name."""
from __future__ import annotations

from typing import Any

from ..plugins import build_named
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
    return build_named(STRATEGIES, "strategy", name, params)


__all__ = ["Strategy", "Aggregator", "ServerOptimizer", "FedAvg", "FedProx", "ServerSGD", "weighted_mean",
           "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Scaffold", "FedNova", "STRATEGIES", "make_strategy"]
