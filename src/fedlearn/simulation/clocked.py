"""Both drivers on the same virtual clock: `ClockedPool` runs the synchronous round loop on it (with an
optional deadline that drops stragglers), `VirtualExecutor` runs the asynchronous driver on it.

Clients still train for real through an inner pool; the clock only decides who is online, how long each task
takes and when results arrive. A task's update is computed when it is sent (from the model it was sent) and
handed over at its finish time, which is what a device training from that model would send then.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

from ..server.async_loop import Task
from ..server.pool import ClientPool
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update
from .clock import VirtualClock

OFFLINE = "offline when the task was sent"
LOST = "went offline during local training; the result never arrived"


def _advance_until_online(pool: ClientPool, clock: VirtualClock, needed: int) -> list[str]:
    """Clients online now, moving the clock forward until at least `needed` are (RuntimeError if never)."""
    fleet = clock.fleet
    while True:
        online = [c for c in pool.client_ids if fleet.online(c, clock.now)]
        if len(online) >= needed:
            return online
        later = min(fleet.next_change(c, clock.now) for c in pool.client_ids)
        if math.isinf(later):
            raise RuntimeError(f"only {len(online)} clients are ever online, {needed} are needed")
        clock.now = later


class ClockedPool(ClientPool):
    """A synchronous round on the virtual clock. Sampling sees only online clients (waiting for `min_online`);
    a round lasts until its last result arrives, or `deadline` seconds when a client is still training then
    (that client is dropped as a timeout and does not train). A client that goes offline mid-task is a drop
    the server notices at that moment, as a closed connection."""

    def __init__(self, pool: ClientPool, clock: VirtualClock, *, deadline: float | None = None,
                 min_online: int = 1) -> None:
        if deadline is not None and deadline <= 0:
            raise ValueError(f"deadline must be positive or None, got {deadline}")
        self.pool, self.clock, self.deadline, self.min_online = pool, clock, deadline, min_online

    @property
    def client_ids(self) -> Sequence[str]:
        return _advance_until_online(self.pool, self.clock, self.min_online)

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        start, fleet = self.clock.now, self.clock.fleet
        ends, outcome, train = [start], {}, {}
        for cid, config in instructions.items():
            if not fleet.online(cid, start):
                outcome[cid] = Failure(cid, "drop", OFFLINE)
                continue
            _, seconds = self.clock.next_task(cid)
            lost = fleet.lost_at(cid, start, seconds)
            if self.deadline is not None and min(seconds, (lost or math.inf) - start) > self.deadline:
                outcome[cid] = Failure(cid, "timeout", f"needs {seconds:.1f}s, the deadline is {self.deadline:g}s")
                ends.append(start + self.deadline)
            elif lost is not None:
                outcome[cid] = Failure(cid, "drop", LOST)
                ends.append(lost)
            else:
                train[cid] = config
                ends.append(start + seconds)
        trained = iter(self.pool.fit(state, train, transforms)) if train else iter(())
        self.clock.now = max(ends)
        return [next(trained) if cid in train else outcome[cid] for cid in instructions]

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        return self.pool.evaluate(state, instructions)

    def close(self) -> None:
        self.pool.close()


class VirtualExecutor:
    """The asynchronous driver's executor on the virtual clock: idle clients are the online ones not busy;
    results arrive at their task's finish time (in send order at the same instant); a client that goes
    offline mid-task is a drop at that moment."""

    def __init__(self, pool: ClientPool, clock: VirtualClock) -> None:
        self.pool, self.clock = pool, clock
        self._events: list[tuple[float, int, Task, Update | Failure]] = []

    @property
    def now(self) -> float:
        return self.clock.now

    def idle(self, busy: set[str]) -> list[str]:
        return [c for c in self.pool.client_ids if c not in busy and self.clock.fleet.online(c, self.clock.now)]

    def start(self, task: Task, state: State, transforms: Sequence[Transform]) -> None:
        _, seconds = self.clock.next_task(task.client_id)
        task.finish_at = self.clock.now + seconds
        task.lost_at = self.clock.fleet.lost_at(task.client_id, self.clock.now, seconds)
        self._schedule(task, state, transforms)

    def resume(self, task: Task, state: State, transforms: Sequence[Transform]) -> bool:
        self._schedule(task, state, transforms)
        return True

    def _schedule(self, task: Task, state: State, transforms: Sequence[Transform]) -> None:
        if task.lost_at is not None:
            event = (task.lost_at, task.seq, task, Failure(task.client_id, "drop", LOST))
        else:
            result = self.pool.fit(state, {task.client_id: task.config}, transforms)[0]
            event = (task.finish_at, task.seq, task, result)
        heapq.heappush(self._events, event)

    def wait(self) -> list[tuple[Task, Update | Failure]] | None:
        if not self._events:  # nobody busy and nobody idle: wait for someone to come online
            _advance_until_online(self.pool, self.clock, 1)
            return None
        at = self._events[0][0]
        arrived = []
        while self._events and self._events[0][0] == at:
            _, _, task, result = heapq.heappop(self._events)
            arrived.append((task, result))
        self.clock.now = at
        return arrived

    def state_dict(self) -> dict:
        return self.clock.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.clock.load_state_dict(state)
