"""Model attacks: malicious clients replace their update with a crafted one."""
from __future__ import annotations

from collections.abc import Iterable
from statistics import NormalDist

import numpy as np

from ..types import Update
from .base import Attack


def positive(what: str, value: float) -> float:
    """`value` as a float, refused unless it is > 0."""
    if not value > 0:
        raise ValueError(f"{what} must be > 0, got {value}")
    return float(value)


class SignFlip(Attack):
    """Send -scale * (honest delta): pushes the model uphill; scale > 1 outweighs the honest majority in a mean."""

    name = "sign_flip"

    def __init__(self, attackers: Iterable[str], seed: int = 0, scale: float = 4.0) -> None:
        super().__init__(attackers, seed)
        self.scale = positive("sign flip scale", scale)

    def forge(self, malicious: list[Update], honest: list[Update], rnd: int) -> list[np.ndarray]:
        return [-self.scale * u.delta for u in malicious]


class GaussianNoise(Attack):
    """Send isotropic Gaussian noise whose expected norm is `scale` times the client's honest update norm."""

    name = "noise"

    def __init__(self, attackers: Iterable[str], seed: int = 0, scale: float = 100.0) -> None:
        super().__init__(attackers, seed)
        self.scale = positive("noise scale", scale)

    def forge(self, malicious: list[Update], honest: list[Update], rnd: int) -> list[np.ndarray]:
        return [self.rng(rnd, u.client_id).normal(0.0, self.scale * np.linalg.norm(u.delta) / np.sqrt(u.delta.size),
                                                   u.delta.size) for u in malicious]


def _benign(malicious: list[Update], honest: list[Update]) -> np.ndarray:
    """The updates an omniscient attacker studies: the honest ones, or its own when it controls the round."""
    return np.stack([u.delta for u in (honest or malicious)])


class ALIE(Attack):
    """"A Little Is Enough" (Baruch et al. 2019): every attacker sends the benign mean moved by z standard
    deviations per coordinate, against the sign of that mean (so each step shrinks or reverses the honest
    one; a fixed sign, as some implementations use, mostly adds a bias the model absorbs). The shift stays
    inside the honest spread, so median- and distance-based rules keep the crafted update.

    `z=None` uses the paper's z_max: with n updates and f attackers, s = floor(n/2 + 1) - f honest clients
    must be won over, and z = Phi^-1((n - s) / n).
    """

    name = "alie"

    def __init__(self, attackers: Iterable[str], seed: int = 0, z: float | None = None) -> None:
        super().__init__(attackers, seed)
        self.z = None if z is None else positive("ALIE z (omit it for the paper's z_max)", z)

    @staticmethod
    def z_max(n: int, f: int) -> float:
        """The largest z that keeps the crafted update inside the range a majority vote would accept."""
        s = n // 2 + 1 - f
        return NormalDist().inv_cdf(min(max((n - s) / n, 0.5), 0.999))

    def forge(self, malicious: list[Update], honest: list[Update], rnd: int) -> list[np.ndarray]:
        benign = _benign(malicious, honest)
        z = self.z if self.z is not None else self.z_max(len(malicious) + len(honest), len(malicious))
        mean = benign.mean(axis=0)
        crafted = mean - z * np.sign(mean) * benign.std(axis=0)
        return [crafted.copy() for _ in malicious]


class IPM(Attack):
    """Inner-product manipulation (Xie et al. 2020): every attacker sends -epsilon * (mean of benign updates),
    making the aggregate's inner product with the true direction small or negative. A small epsilon (0.1)
    hides close to the origin, where Krum picks it; a large one drags means and trimmed means backwards."""

    name = "ipm"

    def __init__(self, attackers: Iterable[str], seed: int = 0, epsilon: float = 0.1) -> None:
        super().__init__(attackers, seed)
        self.epsilon = positive("IPM epsilon", epsilon)

    def forge(self, malicious: list[Update], honest: list[Update], rnd: int) -> list[np.ndarray]:
        crafted = -self.epsilon * _benign(malicious, honest).mean(axis=0)
        return [crafted.copy() for _ in malicious]
