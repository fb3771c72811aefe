"""Seeded client sampling: the same (seed, round) always picks the same clients, so runs resume exactly."""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


class ClientSampler:
    """Sample `count` clients, or a `fraction` of them (at least one), uniformly without replacement."""

    def __init__(self, count: int | None = None, fraction: float | None = None, seed: int = 0) -> None:
        if (count is None) == (fraction is None):
            raise ValueError("give exactly one of clients-per-round count or fraction")
        if count is not None and count < 1:
            raise ValueError(f"clients per round must be >= 1, got {count}")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"client fraction must be in (0, 1], got {fraction}")
        self.count, self.fraction, self.seed = count, fraction, seed

    def size(self, num_clients: int) -> int:
        if self.count is not None:
            if self.count > num_clients:
                raise ValueError(f"cannot sample {self.count} clients per round from {num_clients} clients")
            return self.count
        return max(1, round(self.fraction * num_clients))

    def sample(self, client_ids: Sequence[str], rnd: int) -> list[str]:
        """The clients of round `rnd`, in pool order; all of them when fewer than `count` are available (a
        deployment that goes on with the clients it has)."""
        rng = np.random.default_rng([self.seed, rnd])
        size = len(client_ids) if self.count is not None and self.count > len(client_ids) else self.size(len(client_ids))
        chosen = rng.choice(len(client_ids), size=size, replace=False)
        return [client_ids[i] for i in np.sort(chosen)]


class PoissonSampler:
    """Each client joins round `rnd` independently with probability `rate` (the sampling that DP
    accountants amplify best); the cohort size varies, and may be empty."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"Poisson sampling rate must be in (0, 1], got {rate}")
        self.rate, self.seed = rate, seed

    def sample(self, client_ids: Sequence[str], rnd: int) -> list[str]:
        """The clients of round `rnd`, in pool order."""
        joins = np.random.default_rng([self.seed, rnd, 2]).random(len(client_ids)) < self.rate
        return [c for c, j in zip(client_ids, joins) if j]


def client_seed(seed: int, rnd: int, client_id: str) -> int:
    """Seed for one client's local randomness in one round (shuffling), independent of sampling order."""
    return int(np.random.SeedSequence([seed, rnd, zlib.crc32(client_id.encode())]).generate_state(1)[0])
