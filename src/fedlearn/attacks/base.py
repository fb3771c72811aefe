"""`Attack`: a simulated adversary controlling a fixed set of clients, for evaluating defences.

An attack has a data half (`poison`: rewrite a malicious client's training data once, before the run) and a
model half (`forge`: rewrite the malicious clients' updates each round). The model half runs as the
server-side half of a `Transform`, first in the chain, because the strongest attacks in the literature
(ALIE, IPM) are omniscient: they craft their update from the honest updates of the same round.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from ..transforms.base import Transform
from ..types import Failure, Update

Arrays = tuple[np.ndarray, np.ndarray]


def choose_attackers(client_ids: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """A seeded choice of round(fraction * #clients) clients that stay malicious for the whole run."""
    if not 0 <= fraction < 1:
        raise ValueError(f"attack fraction must be in [0, 1), got {fraction}")
    count = round(fraction * len(client_ids))
    rng = np.random.default_rng([seed, zlib.crc32(b"attackers")])
    return frozenset(client_ids[i] for i in rng.choice(len(client_ids), size=count, replace=False))


class Attack(Transform):
    """Identity by default; subclasses override `poison` (data attacks), `forge` (model attacks) or both."""

    name = "attack"

    def __init__(self, attackers: Iterable[str], seed: int = 0) -> None:
        self.attackers = frozenset(attackers)
        self.seed = seed

    def rng(self, *keys: int | str) -> np.random.Generator:
        """A generator seeded by the attack's seed and `keys` (round, client id), reproducible per run."""
        return np.random.default_rng([self.seed, *(k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys)])

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int, rng: np.random.Generator) -> Arrays:
        """A malicious client's training data as the attacker rewrites it."""
        return x, y

    def poison_clients(self, clients: Mapping[str, Arrays], num_classes: int) -> dict[str, Arrays]:
        """Every client's data, with the attackers' rewritten by `poison`."""
        return {cid: self.poison(x, y, num_classes, self.rng(cid)) if cid in self.attackers else (x, y)
                for cid, (x, y) in clients.items()}

    def forge(self, malicious: list[Update], honest: list[Update], rnd: int) -> list[np.ndarray]:
        """The deltas the malicious clients send instead of their honest ones (same order)."""
        return [u.delta for u in malicious]

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        malicious = [u for u in updates if u.client_id in self.attackers]
        if not malicious:
            return updates, []
        honest = [u for u in updates if u.client_id not in self.attackers]
        forged = dict(zip((u.client_id for u in malicious), self.forge(malicious, honest, rnd), strict=True))
        return [replace(u, delta=forged[u.client_id]) if u.client_id in forged else u for u in updates], []
