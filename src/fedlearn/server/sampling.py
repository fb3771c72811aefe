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


# numpy's SeedSequence constants (O'Neill's seed_seq hash, as numpy.random.bit_generator implements it)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def client_seeds(seed: int, rnd: int, client_ids: Sequence[str]) -> list[int]:
    """`client_seed` of every client of a round, the same numbers computed for all clients at once: the
    SeedSequence hash of (seed, rnd, crc32(id)) run on uint32 arrays instead of one object per client (a
    round of 1,000 clients spent more time hashing seeds than training). Seeds or rounds outside [0, 2**32)
    take more than one hash word each, so they go the one-by-one way."""
    if not (0 <= seed < 2**32 and 0 <= rnd < 2**32):
        return [client_seed(seed, rnd, cid) for cid in client_ids]
    n = len(client_ids)
    crcs = np.fromiter((zlib.crc32(cid.encode()) for cid in client_ids), dtype=np.uint32, count=n)
    words = [np.full(n, seed, dtype=np.uint32), np.full(n, rnd, dtype=np.uint32), crcs,
             np.zeros(n, dtype=np.uint32)]  # the pool's fourth word hashes a zero
    const = [_INIT_A]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint32(const[0])
        const[0] = (const[0] * _MULT_A) & 0xFFFFFFFF
        value = value * np.uint32(const[0])
        return value ^ (value >> np.uint32(16))

    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as the hash means it to
        pool = [hashmix(w) for w in words]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    mixed = np.uint32(_MIX_L) * pool[dst] - np.uint32(_MIX_R) * hashmix(pool[src])
                    pool[dst] = mixed ^ (mixed >> np.uint32(16))
        state = (pool[0] ^ np.uint32(_INIT_B)) * np.uint32((_INIT_B * _MULT_B) & 0xFFFFFFFF)
    return (state ^ (state >> np.uint32(16))).tolist()
