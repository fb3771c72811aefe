"""A seeded virtual clock for a slow, unreliable fleet: how long each client's task takes and when each
client is offline, so a run on one machine reproduces the timing of a real fleet exactly.

Every draw is a pure function of (seed, client id, task number), never of the order in which a driver asks,
so the synchronous round loop (through `ClockedPool`) and the asynchronous driver (through
`VirtualExecutor`) see the same fleet, and a resumed run sees the same future as the uninterrupted one.

- Speed: client c's median task time is ``task_seconds * exp(N(0, speed_sigma))`` (lognormal, heavy-tailed
  for large sigma), or ``speeds[c]`` where given (measured devices); each task of it takes that times
  ``exp(N(0, jitter_sigma))``.
- Availability: a client alternates online and offline periods with exponential lengths (means
  `mean_online`, `mean_offline`; `mean_offline = 0` keeps everyone online). A client offline when a task is
  sent cannot take it; one that goes offline during a task loses it at that moment.
"""
from __future__ import annotations

import bisect
import math
import zlib
from dataclasses import dataclass, field

import numpy as np


def _client_key(client_id: str) -> int:
    return zlib.crc32(client_id.encode())


@dataclass
class Fleet:
    """Per-client speed and availability, seeded; see the module docstring for the model."""

    seed: int = 0
    task_seconds: float = 1.0
    speed_sigma: float = 1.0
    jitter_sigma: float = 0.1
    mean_online: float = 100.0
    mean_offline: float = 0.0
    speeds: dict[str, float] = field(default_factory=dict)
    _periods: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("task_seconds", "mean_online"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Fleet.{name} must be > 0, got {getattr(self, name)}")
        for name in ("speed_sigma", "jitter_sigma", "mean_offline"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Fleet.{name} must be >= 0, got {getattr(self, name)}")
        bad = {c: v for c, v in self.speeds.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"Fleet.speeds must be positive finite seconds, got {bad}")

    def speed(self, client_id: str) -> float:
        """Client's median task time in seconds."""
        if client_id in self.speeds:
            return float(self.speeds[client_id])
        z = np.random.default_rng([self.seed, _client_key(client_id), 11]).standard_normal()
        return self.task_seconds * math.exp(self.speed_sigma * z)

    def duration(self, client_id: str, task: int) -> float:
        """Seconds client `client_id` needs for its `task`-th task (0-based)."""
        z = np.random.default_rng([self.seed, _client_key(client_id), 13, task]).standard_normal()
        return self.speed(client_id) * math.exp(self.jitter_sigma * z)

    def _boundaries(self, client_id: str, until: float) -> list[float]:
        """Times at which the client switches between online and offline, covering [0, until]: the client is
        online on [b[0], b[1]), offline on [b[1], b[2]), online on [b[2], b[3]), ... with b[0] = 0. The first
        online period starts at a random phase of its length, so clients do not all go offline together."""
        bounds = self._periods.get(client_id)
        if bounds is None:
            bounds = self._periods[client_id] = [0.0]
        rng_key = [self.seed, _client_key(client_id), 17]
        while bounds[-1] <= until:
            k = len(bounds) - 1  # index of the period to draw
            rng = np.random.default_rng([*rng_key, k])
            mean = self.mean_online if k % 2 == 0 else self.mean_offline
            length = rng.exponential(mean)
            if k == 0:
                length *= rng.random()
            bounds.append(bounds[-1] + length)
        return bounds

    def online(self, client_id: str, t: float) -> bool:
        """Whether the client is online at time `t`."""
        if self.mean_offline == 0:
            return True
        bounds = self._boundaries(client_id, t)
        return (bisect.bisect_right(bounds, t) - 1) % 2 == 0

    def next_change(self, client_id: str, t: float) -> float:
        """The first time after `t` at which the client goes offline or comes back (inf if it never does)."""
        if self.mean_offline == 0:
            return math.inf
        bounds = self._boundaries(client_id, t)
        return bounds[bisect.bisect_right(bounds, t)]

    def lost_at(self, client_id: str, start: float, seconds: float) -> float | None:
        """When a task from `start` lasting `seconds` is lost because the client goes offline, else None."""
        end = self.next_change(client_id, start)
        return end if end < start + seconds else None


@dataclass
class VirtualClock:
    """Virtual time shared by a driver and its fleet, and how many tasks each client has been given (which
    numbers its next task's duration draw). Both are saved with each committed step for exact resume."""

    fleet: Fleet
    now: float = 0.0
    tasks: dict[str, int] = field(default_factory=dict)

    def next_task(self, client_id: str) -> tuple[int, float]:
        """Number and duration of the client's next task (counting it as given)."""
        k = self.tasks.get(client_id, 0)
        self.tasks[client_id] = k + 1
        return k, self.fleet.duration(client_id, k)

    def state_dict(self) -> dict:
        return {"now": self.now, "tasks": dict(self.tasks)}

    def load_state_dict(self, state: dict) -> None:
        self.now = float(state["now"])
        self.tasks = {str(k): int(v) for k, v in state["tasks"].items()}
