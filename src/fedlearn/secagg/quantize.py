"""Updates into the ring Z_{2^32} and back: clip each coordinate to [-r, r], quantise stochastically
(unbiased) to integer levels 0..L-1, and decode a sum of n such vectors. L is chosen so that the sum of the
whole cohort cannot wrap around the ring."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODULUS = 2**32


def max_levels(cohort: int) -> int:
    """The most quantisation levels for which `cohort` summed vectors stay below the ring modulus."""
    if cohort < 1:
        raise ValueError(f"cohort size must be >= 1, got {cohort}")
    return (MODULUS - 1) // cohort + 1


@dataclass(frozen=True)
class Quantizer:
    """Coordinates clipped to [-clip_range, clip_range], mapped to `levels` integer levels."""

    clip_range: float
    levels: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip range must be a positive finite number, got {self.clip_range}")
        if not 2 <= self.levels <= MODULUS:
            raise ValueError(f"quantisation levels must be in [2, 2^32], got {self.levels}")

    @property
    def step(self) -> float:
        """Width of one quantisation level."""
        return 2 * self.clip_range / (self.levels - 1)

    def check_cohort(self, cohort: int) -> None:
        """Raise unless `cohort` vectors can be summed without wrapping the ring."""
        if cohort * (self.levels - 1) >= MODULUS:
            raise ValueError(f"{cohort} clients x {self.levels} levels would overflow the 2^32 ring; "
                             f"use at most {max_levels(cohort)} levels")

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip, scale to [0, L-1] and round up with probability equal to the fraction (unbiased)."""
        scaled = (np.clip(x, -self.clip_range, self.clip_range) + self.clip_range) / self.step
        low = np.floor(scaled)
        q = low + (rng.random(x.shape) < scaled - low)
        return np.minimum(q, self.levels - 1).astype(np.uint32)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of `count` vectors from the integer sum of their encodings."""
        return total.astype(np.float64) * self.step - count * self.clip_range

    def max_rounding_norm(self, dim: int) -> float:
        """Largest L2 distance between a clipped vector and its decoded quantisation (one step per coordinate)."""
        return self.step * math.sqrt(dim)
