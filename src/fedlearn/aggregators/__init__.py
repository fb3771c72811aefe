"""Byzantine-robust aggregators: drop-in replacements for the weighted mean of any strategy.

Each is a callable `(deltas (n, d), weights (n,)) -> (d,)` with a `min_updates` attribute (the fewest
updates per round its assumption allows); its docstring says how many Byzantine clients it tolerates.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from ..plugins import build_named
from ..strategies.base import Aggregator, Strategy
from ..strategies.fedavg import weighted_mean
from .centered_clipping import CenteredClipping
from .fltrust import FLTrust
from .krum import Bulyan, Krum
from .median import CoordinateMedian
from .norm_bounding import NormBounding
from .trimmed_mean import TrimmedMean

AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "mean": lambda: weighted_mean,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": partial(Krum, m=None),
    "bulyan": Bulyan,
    "centered_clipping": CenteredClipping,
    "norm_bounding": NormBounding,
    "fltrust": FLTrust,
}


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """Build an aggregator by its registered name with keyword parameters (e.g. f=2, beta=0.1)."""
    return build_named(AGGREGATORS, "aggregator", name, params)


def use_aggregator(strategy: Strategy, aggregator: Aggregator, name: str) -> None:
    """Replace `strategy`'s weighted mean by `aggregator` (called `name` in messages); `ValueError` for a
    strategy that combines updates by its own rule."""
    if not strategy.takes_aggregator:
        raise ValueError(f"strategy {strategy.name!r} combines updates by its own rule and cannot use the "
                         f"{name!r} aggregator; use fedavg, fedprox, a FedOpt strategy or scaffold")
    strategy.aggregator = aggregator


def min_updates(aggregator: Aggregator) -> int:
    """The fewest updates per round `aggregator` accepts (1 for plain functions such as the weighted mean)."""
    return int(getattr(aggregator, "min_updates", 1))


__all__ = ["AGGREGATORS", "make_aggregator", "use_aggregator", "min_updates", "CoordinateMedian", "TrimmedMean", "Krum", "Bulyan",
           "CenteredClipping", "NormBounding", "FLTrust"]
