"""Anomaly checks on every update just before aggregation, whatever the aggregator.

Four checks, in order; the first that fires excludes the update as a `Failure` of kind "flagged" with the
reason, so it is stored with the round and counted in the progress line:

1. malformed: wrong layout or non-finite values, re-checked after the server-side transforms (decoders,
   simulated attacks) because validation ran before them;
2. weight outlier: the robust z-score of the log example count (the client's own claim, its weight in the
   mean) is above `weight_z`; a client claiming far more data than the round's others would steer it;
3. norm outlier: the robust z-score of the log norm (median and MAD over the round) is above `norm_z`;
   log norms, because honest norms grow with local data size and spread multiplicatively;
4. direction outlier: the robust z-score of the cosine to the coordinate-wise median update is below
   `-cosine_z`, which catches flipped or unrelated directions of any size.

Checks 2 to 4 repeat on the updates still kept until nothing new is flagged, since a cluster of attackers
inflates the spread that hides them. Statistics need a crowd, so they run only while at least `min_updates`
updates are left. The default thresholds are loose enough that honest clients on strongly non-IID data
(Dirichlet alpha = 0.5, the default run) are not flagged.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..types import Failure, Update
from .store import RoundRecord
from .validate import update_problem

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


def robust_z(values: np.ndarray, min_scale: float) -> np.ndarray:
    """(x - median) / (1.4826 * MAD), with the scale floored at `min_scale` so near-identical values
    (MAD ~ 0) do not turn tiny differences into huge scores."""
    center = np.median(values)
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(values - center))), min_scale)
    return (values - center) / scale


@dataclass(frozen=True)
class AnomalyChecks:
    """Thresholds of the checks; `screen` applies them to one round's updates."""

    norm_z: float = 6.0
    cosine_z: float = 6.0
    weight_z: float = 6.0
    min_updates: int = 5
    min_log_norm_scale: float = 0.2
    min_cosine_scale: float = 0.1
    min_log_weight_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("norm_z", "cosine_z", "weight_z", "min_log_norm_scale", "min_cosine_scale",
                     "min_log_weight_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"anomaly check setting {name} must be > 0, got {getattr(self, name)}")
        if self.min_updates < 3:
            raise ValueError(f"anomaly check min_updates must be >= 3 for robust statistics, got {self.min_updates}")

    def screen(self, updates: list[Update], size: int) -> tuple[list[Update], list[Failure]]:
        """Split the round's updates into kept ones and flagged ones (with reasons)."""
        reasons: dict[int, str] = {}
        for i, u in enumerate(updates):
            problem = update_problem(u, expected_client=u.client_id, rnd=u.round, size=size)
            if problem is not None:
                reasons[i] = f"malformed after server transforms: {problem}"
        while True:  # repeat on what is left: removing the worst outliers sharpens the honest statistics
            rest = [i for i in range(len(updates)) if i not in reasons]
            found = self._outliers([updates[i] for i in rest], rest) if len(rest) >= self.min_updates else {}
            if not found:
                break
            reasons.update(found)
        kept = [u for i, u in enumerate(updates) if i not in reasons]
        flagged = [Failure(updates[i].client_id, "flagged", reasons[i]) for i in sorted(reasons)]
        return kept, flagged

    def _outliers(self, updates: list[Update], index: list[int]) -> dict[int, str]:
        stack = np.stack([u.delta for u in updates])
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        weight_z = robust_z(np.log(np.maximum(weights, 1.0)), self.min_log_weight_scale)
        tiny = np.finfo(float).tiny
        norms = np.linalg.norm(stack, axis=1)
        norm_z = robust_z(np.log(np.maximum(norms, tiny)), self.min_log_norm_scale)
        median = np.median(stack, axis=0)
        cosines = stack @ median / np.maximum(norms * np.linalg.norm(median), tiny)
        cos_z = robust_z(cosines, self.min_cosine_scale)
        found: dict[int, str] = {}
        for k, i in enumerate(index):
            if weight_z[k] > self.weight_z:
                found[i] = (f"weight outlier: claims {weights[k]:.4g} examples, {weights[k] / np.median(weights):.1f}x "
                            f"the round's median (robust z {weight_z[k]:.1f} > {self.weight_z:g})")
            elif norm_z[k] > self.norm_z:
                found[i] = (f"norm outlier: norm {norms[k]:.3g} is {norms[k] / np.median(norms):.1f}x the round's "
                            f"median (robust z {norm_z[k]:.1f} > {self.norm_z:g})")
            elif cos_z[k] < -self.cosine_z:
                found[i] = (f"direction outlier: cosine {cosines[k]:.2f} to the median update, round median "
                            f"{np.median(cosines):.2f} (robust z {cos_z[k]:.1f} < -{self.cosine_z:g})")
        return found


def make_anomaly_checks(enabled: bool = True, **thresholds: float) -> AnomalyChecks | None:
    """Anomaly checks from config values, or None when `enabled` is false."""
    if not enabled:
        return None
    try:
        return AnomalyChecks(**thresholds)
    except TypeError as exc:
        raise ValueError(f"bad anomaly check setting: {exc}") from None


def flag_counts(rounds: Iterable[RoundRecord]) -> Counter[str]:
    """How many rounds each client was flagged in."""
    return Counter(f.client_id for r in rounds for f in r.failures if f.kind == "flagged")
