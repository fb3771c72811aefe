"""Seeded fault injection for simulation: crashes, drops and stragglers, decided per (seed, round, client)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


class InjectedCrash(RuntimeError):
    """Raised inside a client's task to simulate a crash."""


class InjectedDrop(RuntimeError):
    """Raised inside a client's task to simulate a client that vanished without answering."""


@dataclass(frozen=True)
class FaultInjector:
    """Each sampled client independently crashes with `crash_rate`, drops (never answers) with `drop_rate`,
    or else is a straggler with `straggler_rate`, finishing a uniform random fraction of its local steps."""

    crash_rate: float = 0.0
    drop_rate: float = 0.0
    straggler_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("crash_rate", "drop_rate", "straggler_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.crash_rate + self.drop_rate > 1:
            raise ValueError("crash_rate + drop_rate must not exceed 1")

    def decide(self, rnd: int, client_id: str) -> tuple[str, float]:
        """('crash' | 'drop' | 'ok', work_fraction) for this client in this round."""
        if self.crash_rate == self.drop_rate == self.straggler_rate == 0:  # no faults: skip the per-client RNG
            return "ok", 1.0
        rng = np.random.default_rng([self.seed, rnd, zlib.crc32(client_id.encode()), 7])
        fate, straggle, fraction = rng.random(3)
        if fate < self.crash_rate:
            return "crash", 1.0
        if fate < self.crash_rate + self.drop_rate:
            return "drop", 1.0
        if straggle < self.straggler_rate:
            return "ok", float(max(fraction, 1e-3))
        return "ok", 1.0
