"""L2 clipping of a flat update, and the adaptive clip norm of Andrew et al. 2021 ("Differentially
private learning with adaptive clipping"): track a target quantile of the update norms with a geometric
step driven by the noised fraction of clients that were not clipped."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def clip_l2(delta: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """`delta` scaled down to L2 norm at most `bound`, and whether it was already within the bound."""
    norm = float(np.linalg.norm(delta))
    if norm <= bound:
        return delta, True
    return delta * (bound / norm), False


@dataclass(frozen=True)
class AdaptiveClipping:
    """C <- C * exp(-lr * (b - quantile)), b the noised fraction of unclipped updates.

    `count_noise` is the std of the Gaussian noise on the count of unclipped updates (default: expected
    cohort / 20, the paper's choice); it costs privacy, which `update_noise_multiplier` accounts for.
    """

    quantile: float = 0.5
    lr: float = 0.2
    count_noise: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"target clipping quantile must be in (0, 1), got {self.quantile}")
        if self.lr <= 0:
            raise ValueError(f"clipping learning rate must be > 0, got {self.lr}")
        if self.count_noise is not None and self.count_noise <= 0:
            raise ValueError(f"count noise must be > 0, got {self.count_noise}")

    def count_std(self, expected_clients: float) -> float:
        return self.count_noise if self.count_noise is not None else expected_clients / 20

    def update_noise_multiplier(self, total: float, expected_clients: float) -> float:
        """Noise multiplier left for the updates when the whole round must cost as much as Gaussian noise of
        multiplier `total`: 1/total^2 = 1/z_updates^2 + 1/(2 sigma_count)^2 (Andrew et al., Theorem 1)."""
        count_term = (2 * self.count_std(expected_clients)) ** -2
        if total ** -2 <= count_term:
            raise ValueError(f"the clipped-count noise (std {self.count_std(expected_clients):g}) already spends the "
                             f"whole budget of noise multiplier {total:g}; raise count_noise above {total / 2:g}")
        return (total ** -2 - count_term) ** -0.5

    def next_clip(self, clip: float, unclipped: float, expected_clients: float, rng: np.random.Generator) -> float:
        """The clip norm for the next round from the count of unclipped updates this round."""
        fraction = (unclipped + rng.normal(0.0, self.count_std(expected_clients))) / expected_clients
        return clip * math.exp(-self.lr * (fraction - self.quantile))
