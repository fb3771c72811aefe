"""The [async] settings: buffered asynchronous training (FedBuff) instead of synchronous rounds, and, in
simulation, the virtual-clock fleet it runs on.

    [async]
    buffer_size = 10          # K: results per server step
    concurrency = 20          # clients training at once
    max_staleness = 10        # results more than this many steps old are dropped (omit: keep all)
    staleness = "sqrt"        # weight of a result s steps old: "sqrt" 1/sqrt(1+s), "poly" (1+s)^-exponent, "constant"
    staleness_exponent = 0.5  # for "poly"
    eval_every = 1            # central evaluation every that many steps (and at the last)
    # simulation only: the seeded virtual fleet (see fedlearn.simulation.clock.Fleet)
    speed_sigma = 1.0         # client median task time exp(N(0, speed_sigma)) * task_seconds
    jitter_sigma = 0.1        # per-task jitter exp(N(0, jitter_sigma))
    task_seconds = 1.0
    mean_online = 100.0       # mean seconds online between offline periods
    mean_offline = 0.0        # mean seconds offline (0: always online)
    fleet_seed = 0            # default: the run's seed

With [async], `rounds` counts server steps; sampling (clients_per_round, fraction) is replaced by
`concurrency`, and every step is one record in the run store.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import ConfigError
from .plugins import dataclass_from_dict
from .server.async_loop import AsyncSettings
from .simulation.clock import Fleet

STALENESS = ("sqrt", "poly", "polynomial", "constant")
FLEET_KEYS = ("speed_sigma", "jitter_sigma", "task_seconds", "mean_online", "mean_offline", "fleet_seed")


@dataclass(frozen=True)
class AsyncConfig:
    """The [async] section (see the module docstring); `from_dict` validates it, naming the bad setting."""

    buffer_size: int = 10
    concurrency: int = 20
    max_staleness: int | None = None
    staleness: str = "sqrt"
    staleness_exponent: float = 0.5
    eval_every: int = 1
    speed_sigma: float = Fleet.speed_sigma
    jitter_sigma: float = Fleet.jitter_sigma
    task_seconds: float = Fleet.task_seconds
    mean_online: float = Fleet.mean_online
    mean_offline: float = Fleet.mean_offline
    fleet_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("buffer_size", "concurrency", "eval_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.max_staleness is None or self.max_staleness >= 0, "max_staleness", "must be >= 0 (omit it to keep "
               "every result)", self.max_staleness)
        _check(self.staleness in STALENESS, "staleness", 'must be "sqrt", "poly" or "constant"', self.staleness)
        _check(math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0, "staleness_exponent",
               "must be a finite number >= 0", self.staleness_exponent)
        for name in ("task_seconds", "mean_online"):
            _check(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "must be > 0",
                   getattr(self, name))
        for name in ("speed_sigma", "jitter_sigma", "mean_offline"):
            _check(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be >= 0",
                   getattr(self, name))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AsyncConfig":
        return dataclass_from_dict(cls, values, ConfigError, "[async] ", describe=lambda k: k)

    @classmethod
    def for_deployment(cls, values: dict[str, Any]) -> "AsyncConfig":
        """The settings of a deployment's [async] section, where the fleet is real: its keys are refused."""
        given = sorted(set(values) & set(FLEET_KEYS))
        if given:
            raise ConfigError(f"[async] {', '.join(given)}: the virtual fleet is simulation-only; a deployment's "
                                   "clients train at their own speed and come and go as they do")
        return cls.from_dict(values)

    def settings(self) -> AsyncSettings:
        """The server's settings (`AsyncServer` through `AsyncSettings.server_args`)."""
        staleness = "polynomial" if self.staleness == "poly" else self.staleness
        return AsyncSettings(self.buffer_size, self.concurrency, staleness, self.staleness_exponent,
                             self.max_staleness, self.eval_every)

    def fleet(self, seed: int) -> Fleet:
        """The simulated fleet; `fleet_seed`, else the run's `seed`."""
        return Fleet(seed=seed if self.fleet_seed is None else self.fleet_seed, task_seconds=self.task_seconds,
                     speed_sigma=self.speed_sigma, jitter_sigma=self.jitter_sigma, mean_online=self.mean_online,
                     mean_offline=self.mean_offline)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"[async] {name} {rule}, got {value!r}")


