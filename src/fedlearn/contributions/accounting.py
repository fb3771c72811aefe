"""Per-round contribution scores of the accepted clients, from their updates and the server's validation
data, without retraining: the model of a coalition is the round's starting model plus the example-weighted
mean of the coalition's updates (the FedAvg step it would have made), and its utility is a validation
metric of that model. The round loop calls `score` after aggregation; the run store adds the scores to
each client's cumulative ledger in the round's transaction.

Methods: "gtg" (GTG-Shapley), "loo" (leave-one-out), "exact" (exact Shapley, 2^n evaluations, refused
above `max_exact` clients), and "cosine": the cosine of a client's update to the weighted mean of the
other accepted updates, a free-to-compute alignment signal (FedCE-style) that needs no validation data;
a zero or random update scores about 0, an update against the others below 0.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..params import Layout
from ..types import Metrics, State, Update
from .shapley import Utility, exact_shapley, gtg_shapley, leave_one_out

METHODS = ("gtg", "loo", "exact", "cosine")


@dataclass
class ContributionAccounting:
    """Scores each round's accepted updates. `evaluate(state)` returns validation metrics; `metric` is the
    one used as utility (a name containing "loss" is negated, so higher is always better)."""

    evaluate: Callable[[State], Metrics]
    methods: Sequence[str] = ("gtg", "cosine")
    metric: str = "accuracy"
    truncation: float = 1e-3
    tolerance: float = 0.03
    max_exact: int = 12
    seed: int = 0
    last_evaluations: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown contribution method(s) {unknown or list(self.methods)}; choose from {', '.join(METHODS)}")

    def score(self, layout: Layout, params: np.ndarray, updates: Sequence[Update], rnd: int) -> dict[str, dict[str, float]]:
        """Client id -> method -> score for the updates accepted in round `rnd`, starting from `params`."""
        n = len(updates)
        deltas = np.stack([u.delta for u in updates]).astype(np.float64)
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        sign = -1.0 if "loss" in self.metric else 1.0

        def coalition_value(members: frozenset[int]) -> float:
            if not members:
                return sign * self._metric(layout.unflatten(params))
            idx = sorted(members)
            step = np.average(deltas[idx], axis=0, weights=weights[idx])
            return sign * self._metric(layout.unflatten(params + step))

        utility = Utility(coalition_value)
        scores: dict[str, np.ndarray] = {}
        for method in self.methods:
            if method == "gtg":
                scores[method] = gtg_shapley(n, utility, truncation=self.truncation, tolerance=self.tolerance,
                                             seed=self.seed * 1_000_003 + rnd)
            elif method == "loo":
                scores[method] = leave_one_out(n, utility)
            elif method == "exact":
                if n > self.max_exact:
                    raise ValueError(f"exact Shapley over {n} clients needs 2^{n} evaluations; use gtg, or raise max_exact")
                scores[method] = exact_shapley(n, utility)
            else:
                scores[method] = cosine_to_others(deltas, weights)
        self.last_evaluations = utility.evaluations
        return {u.client_id: {m: float(s[k]) for m, s in scores.items()} for k, u in enumerate(updates)}

    def _metric(self, state: State) -> float:
        metrics = self.evaluate(state)
        if self.metric not in metrics:
            raise ValueError(f"contribution metric {self.metric!r} is not among the validation metrics {sorted(metrics)}")
        return float(metrics[self.metric])


def cosine_to_others(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Cosine of each update to the weighted mean of the other updates (0 where either is zero, and for a
    lone update, which has no others)."""
    total = weights @ deltas
    others = (total[None, :] - weights[:, None] * deltas) / np.maximum(weights.sum() - weights, 1e-300)[:, None]
    norms = np.linalg.norm(deltas, axis=1) * np.linalg.norm(others, axis=1)
    dots = np.einsum("ij,ij->i", deltas, others)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
