"""Differential privacy for federated statistics: noise on the summed ``sums`` vector before it is released.

Adjacent data sets differ by one row (added or removed) anywhere in the federation. Every value is clipped to
its declared bounds and turned into a z-score in [-1, 1], so one row changes the count by 1, each feature's
sum of z by at most 1, each sum of z^2 by at most 1, and (with a histogram) one bin of each feature by 1:

    L1 sensitivity  = 1 + d (2 + h)          L2 sensitivity = sqrt(1 + d (2 + h))

for d features, h = 1 with a histogram and 0 without. The Gaussian mechanism adds N(0, (z * L2)^2) to every
coordinate (epsilon at `delta` from the RDP accountant, one release); the Laplace mechanism adds Laplace noise
of scale L1 / epsilon (pure epsilon-DP). The server adds the noise after summing (central DP): whoever reads
the released statistics learns little about any one row, but the server itself saw the exact sum, unless
secure aggregation hid the individual summaries (it still sees their exact sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MECHANISMS = ("gaussian", "laplace")


@dataclass(frozen=True)
class StatisticsDP:
    """DP for one statistics release: "gaussian" with `noise_multiplier` (epsilon reported at `delta`), or
    "laplace" with the target `epsilon` (delta 0)."""

    mechanism: str = "gaussian"
    noise_multiplier: float = 1.0
    epsilon: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"DP mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.mechanism == "gaussian" and not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"the Gaussian noise multiplier must be > 0, got {self.noise_multiplier}")
        if self.mechanism == "laplace" and not (self.epsilon is not None and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"the Laplace mechanism needs a target epsilon > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @staticmethod
    def sensitivity(features: int, histogram: bool, norm: int) -> float:
        """The L1 (`norm` 1) or L2 (`norm` 2) sensitivity of the sums vector to one row (see the module)."""
        terms = 1 + features * (3 if histogram else 2)
        return float(terms) if norm == 1 else math.sqrt(terms)

    def noise_std(self, features: int, histogram: bool) -> float:
        """Standard deviation of the noise on each coordinate."""
        if self.mechanism == "gaussian":
            return self.noise_multiplier * self.sensitivity(features, histogram, 2)
        return math.sqrt(2.0) * self.sensitivity(features, histogram, 1) / self.epsilon

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta) of one release."""
        if self.mechanism == "laplace":
            return float(self.epsilon), 0.0
        from ..privacy.accountant import gaussian_epsilon

        return gaussian_epsilon(self.noise_multiplier, 1, self.delta), self.delta

    def add_noise(self, sums: np.ndarray, features: int, histogram: bool, rng: np.random.Generator) -> np.ndarray:
        """`sums` (count, sums of z and z^2, histogram) with this mechanism's noise on every coordinate."""
        if self.mechanism == "gaussian":
            return sums + rng.normal(0.0, self.noise_std(features, histogram), size=sums.shape)
        return sums + rng.laplace(0.0, self.sensitivity(features, histogram, 1) / self.epsilon, size=sums.shape)
