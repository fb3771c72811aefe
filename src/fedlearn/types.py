"""Core value types that flow through a round: model state, updates, failures."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

State = OrderedDict[str, np.ndarray]
"""Model state: an ordered mapping from parameter name to array (see `params.Layout`)."""

Metrics = dict[str, float]
Config = dict[str, Any]


@dataclass
class Update:
    """What one client sends back after local training.

    `delta` is the flat change of the model (new - old) in the round's `Layout` order, kept in float64 so
    that aggregation is exact enough to reproduce centralized SGD bit for bit with one client.
    `partial` marks a straggler that finished only part of its local work.
    `extras` holds named flat vectors, in the delta's `Layout` order, that a strategy asks clients for besides
    the delta (SCAFFOLD's new control variate); they are validated and serialized like the delta.
    """

    client_id: str
    round: int
    delta: np.ndarray
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    partial: bool = False
    extras: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A sampled client whose result did not reach (or was refused by) the aggregator, with the reason."""

    client_id: str
    kind: str  # "crash", "drop", "rejected", "straggler", "timeout", "flagged" (by the anomaly checks)
    reason: str


@dataclass
class EvalResult:
    """Metrics of one client's federated evaluation."""

    client_id: str
    num_examples: int
    metrics: Metrics


def new_state(items: Any = ()) -> State:
    """Build an ordered model state from (name, array) pairs or a mapping."""
    return OrderedDict(items)
