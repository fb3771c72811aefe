"""Privacy accounting with dp-accounting: epsilon at a given delta after T rounds of the sampled Gaussian
mechanism of client-level DP, by RDP or by privacy loss distributions (PLD, tighter).

Sampling: "poisson" (each client joins a round independently with probability q; add/remove neighbours)
or "fixed" (a uniformly random cohort of m of N clients; replace-one neighbours, for which the sum of
clipped updates has sensitivity 2C, so the noise multiplier is halved in the event). PLD supports Poisson
sampling only; fixed-size cohorts are accounted by RDP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# dp_accounting takes seconds to import, so it is imported where epsilon is computed, not with fedlearn.

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


class PrivacyBudgetError(ValueError):
    """A privacy setting that cannot be met (a budget too small for even one round, no noise, ...)."""


@dataclass(frozen=True)
class SampledGaussian:
    """One round of client-level DP: a cohort sampled from `population` clients (`cohort` = fixed size,
    or expected size under Poisson sampling), Gaussian noise of `noise_multiplier` times the clip norm."""

    noise_multiplier: float
    population: int
    cohort: int
    sampling: str = "poisson"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise PrivacyBudgetError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyBudgetError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.accountant == "pld" and self.sampling == "fixed":
            raise PrivacyBudgetError("the PLD accountant supports Poisson sampling only; use the RDP accountant "
                                     "for fixed-size cohorts, or Poisson sampling")
        if not 1 <= self.cohort <= self.population:
            raise PrivacyBudgetError(f"cohort {self.cohort} must be between 1 and the {self.population} clients")
        if self.noise_multiplier < 0:
            raise PrivacyBudgetError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")

    @property
    def sampling_rate(self) -> float:
        return self.cohort / self.population

    def event(self, rounds: int) -> Any:
        """The dp-accounting event of `rounds` rounds."""
        import dp_accounting

        if self.sampling == "poisson":
            one = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        else:
            one = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, self.cohort, dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    def epsilon(self, rounds: int, delta: float) -> float:
        """Epsilon at `delta` after `rounds` rounds (0 for no rounds, inf without noise)."""
        return _epsilon(self, rounds, delta)


@lru_cache(maxsize=4096)
def _epsilon(mech: SampledGaussian, rounds: int, delta: float) -> float:
    if rounds <= 0:
        return 0.0
    if mech.noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting import pld, rdp

    if mech.accountant == "rdp":
        neighbours = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if mech.sampling == "poisson"
                      else dp_accounting.NeighboringRelation.REPLACE_ONE)
        acc = rdp.RdpAccountant(neighboring_relation=neighbours)
    else:
        acc = pld.PLDAccountant()
    acc.compose(mech.event(rounds))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=4096)
def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Gaussian releases without sampling (local DP on one client), by RDP."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, *, population: int, cohort: int,
                      sampling: str = "poisson", accountant: str = "rdp", tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (within `tolerance`, relative) whose epsilon after `rounds` rounds is at
    most `target_epsilon` at `delta`."""
    if not target_epsilon > 0:
        raise PrivacyBudgetError(f"target epsilon must be > 0, got {target_epsilon}")

    def eps(z: float) -> float:
        return SampledGaussian(z, population, cohort, sampling, accountant).epsilon(rounds, delta)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise PrivacyBudgetError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


def affordable_rounds(mech: SampledGaussian, budget: float, delta: float, limit: int) -> int:
    """The most rounds (up to `limit`) whose epsilon stays within `budget` (epsilon grows with rounds)."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if mech.epsilon(mid, delta) <= budget else (low, mid - 1)
    return low
