"""Per-client evaluation: a mean hides the clients that personalisation hurts, so report them.

Each client evaluates on its own test split; `compare` sets one method's per-client accuracies beside a
baseline's (usually FedAvg's global model on the same clients) and reports the mean, the 10th percentile
and the fraction of clients whose accuracy went down, as Google's Motley benchmark recommends.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..client import Client
from ..types import Config, State


def per_client_metric(client_fn: Callable[[str], Client], client_ids: Sequence[str], state: State,
                      config: Config | None = None, metric: str = "accuracy") -> dict[str, float]:
    """`metric` of every client's `evaluate(state, config)` on its own data, by client id."""
    out = {}
    for cid in client_ids:
        metrics = client_fn(cid).evaluate(state, dict(config or {}))
        if metric not in metrics:
            raise KeyError(f"client {cid!r} reported no {metric!r}; it reported {sorted(metrics)}")
        out[cid] = float(metrics[metric])
    return out


@dataclass(frozen=True)
class PersonalizationReport:
    """Per-client accuracies of a method against a baseline on the same clients."""

    mean: float
    p10: float  # 10th percentile over clients
    baseline_mean: float
    fraction_hurt: float  # clients whose accuracy is lower than under the baseline
    clients: int

    @property
    def gain(self) -> float:
        """Mean per-client accuracy minus the baseline's."""
        return self.mean - self.baseline_mean


def compare(method: Mapping[str, float], baseline: Mapping[str, float], tolerance: float = 0.0) -> PersonalizationReport:
    """Compare per-client values of `method` with `baseline` (same client ids). A client counts as hurt when
    its value is below the baseline's by more than `tolerance`."""
    if set(method) != set(baseline) or not method:
        raise ValueError(f"method and baseline must cover the same non-empty clients "
                         f"({len(method)} vs {len(baseline)}, {len(set(method) ^ set(baseline))} differ)")
    ids = sorted(method)
    ours = np.array([method[c] for c in ids])
    theirs = np.array([baseline[c] for c in ids])
    return PersonalizationReport(mean=float(ours.mean()), p10=float(np.percentile(ours, 10)),
                                 baseline_mean=float(theirs.mean()),
                                 fraction_hurt=float(np.mean(ours < theirs - tolerance)), clients=len(ids))
