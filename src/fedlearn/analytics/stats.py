"""Federated statistics as the server holds them, and the arithmetic that combines clients' summaries.

Means and variances are combined in float64 by Chan, Golub and LeVeque's pairwise update (each client's count,
mean and sum of squared deviations M2), which never subtracts two large sums of squares; secure aggregation
and DP deliver sums of z-scores instead (z = (x - centre) / half-range lies in [-1, 1], so the subtraction
is of numbers of the size of the count). Quantiles come from the equal-width histogram: the estimate of order
statistic x_(k) lies in the bin that holds x_(k), so it is within one bin width of it (see `quantile`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Moments = tuple[float, np.ndarray, np.ndarray]  # (count, mean, M2)


def chan_merge(parts: Sequence[Moments], features: int) -> Moments:
    """Combine per-client (count, mean, M2) into those of the pooled rows (clients with no rows add nothing)."""
    n, mean, m2 = 0.0, np.zeros(features), np.zeros(features)
    for nb, mean_b, m2_b in parts:
        if nb <= 0:
            continue
        total = n + nb
        delta = mean_b - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2_b + delta * delta * (n * nb / total)
        n = total
    return n, mean, m2


def moments_from_sums(n: float, s1: np.ndarray, s2: np.ndarray, low: np.ndarray, high: np.ndarray) -> Moments:
    """(count, mean, M2) of rows from the sums of their z-scores over declared bounds [low, high]. With noisy
    sums (DP) M2 is kept >= 0 and the mean inside the bounds."""
    centre, half = (high + low) / 2, (high - low) / 2
    if n <= 0:
        return n, np.full_like(centre, np.nan), np.full_like(centre, np.nan)
    mean_z = np.clip(s1 / n, -1.0, 1.0)
    return n, centre + half * mean_z, np.maximum(s2 - s1 * mean_z, 0.0) * half * half


def histogram_quantile(counts: np.ndarray, low: float, high: float, q: float) -> float:
    """The q-quantile (numpy's default, linear between order statistics of rank q (n - 1)) estimated from
    equal-width bin counts over [low, high]: order statistic k is placed inside its bin, at the centre of its
    share of that bin, and the result is interpolated between ranks floor and ceil of q (n - 1)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    width = (high - low) / len(counts)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])

    def order_statistic(k: float) -> float:
        b = int(np.clip(np.searchsorted(cumulative, k, side="right") - 1, 0, len(counts) - 1))
        while counts[b] <= 0 and b > 0:  # a rank at the very top of a (noisy) count lands in the last filled bin
            b -= 1
        within = (k - cumulative[b] + 0.5) / counts[b] if counts[b] > 0 else 0.5
        return low + width * (b + float(np.clip(within, 0.0, 1.0)))

    rank = q * (total - 1) if total >= 1 else 0.0
    below, above = np.floor(rank), np.ceil(rank)
    return order_statistic(below) + (rank - below) * (order_statistic(above) - order_statistic(below))


@dataclass
class FederatedStatistics:
    """Per-feature statistics of all contributing clients' rows, computed without pooling them.

    `count` rows from `clients`; `mean`, `var` (sample variance, ddof=1) and `std`; `minimum` / `maximum`
    (None under secure aggregation or DP, which deliver only sums: see `fedlearn.analytics`); `histogram`
    (features, bins) over [`low`, `high`] per feature, from which `quantile(q)` estimates quantiles within
    `quantile_error` (one bin width; under DP the counts are noisy and no bound holds). `dropped` maps each
    client left out to the reason; `epsilon` / `delta` / `noise_std` describe DP noise when it was added.
    """

    count: float
    mean: np.ndarray
    var: np.ndarray
    low: np.ndarray
    high: np.ndarray
    histogram: np.ndarray | None
    clients: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    minimum: np.ndarray | None = None
    maximum: np.ndarray | None = None
    exchanges: int = 1
    secure: bool = False
    epsilon: float | None = None
    delta: float | None = None
    noise_std: float | None = None

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation per feature."""
        return np.sqrt(self.var)

    @property
    def quantile_error(self) -> np.ndarray:
        """Per feature, the most a `quantile` estimate lies outside [x_(floor r), x_(ceil r)], the order
        statistics around rank r = q (n - 1): one bin width (exact counts only, values inside [low, high])."""
        bins = 1 if self.histogram is None else self.histogram.shape[1]
        return (self.high - self.low) / bins

    def quantile(self, q: float) -> np.ndarray:
        """Estimated q-quantile of every feature from the histogram (see `quantile_error`)."""
        if self.histogram is None:
            raise ValueError("these statistics were computed without a histogram (bins=0); ask for bins to get quantiles")
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile needs 0 <= q <= 1, got {q}")
        return np.array([histogram_quantile(c, lo, hi, q) for c, lo, hi in zip(self.histogram, self.low, self.high)])

    def standardizer(self) -> "Standardizer":
        """The standardiser (x - mean) / std of these statistics."""
        from .standardize import Standardizer

        return Standardizer.from_statistics(self)
