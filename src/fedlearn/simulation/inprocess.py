"""Sequential in-process client pool: clients are built on demand by `client_fn`, one at a time."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from ..client import Client, run_fit
from ..server.pool import ClientPool
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update
from .faults import FaultInjector, InjectedCrash

log = logging.getLogger(__name__)

ClientFn = Callable[[str], Client]


class InProcessPool(ClientPool):
    """Runs each client's task in this process. Client objects are created per task by `client_fn(cid)`
    and dropped afterwards, so memory grows with the cohort, not with the number of clients."""

    def __init__(self, client_fn: ClientFn, client_ids: Sequence[str], faults: FaultInjector | None = None) -> None:
        if not client_ids:
            raise ValueError("a client pool needs at least one client id")
        self.client_fn = client_fn
        self._ids = [str(c) for c in client_ids]
        self.faults = faults or FaultInjector()

    @property
    def client_ids(self) -> Sequence[str]:
        return self._ids

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        results: list[Update | Failure] = []
        for cid, config in instructions.items():
            fate, fraction = self.faults.decide(int(config.get("round", 0)), cid)
            if fate == "drop":
                results.append(Failure(cid, "drop", "injected: client dropped out and never answered"))
                continue
            config = {**config, "work_fraction": fraction} if fraction < 1.0 else config
            results.append(self._guarded(cid, lambda c: self._fit_one(c, state, config, transforms, fate == "crash")))
        return results

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        def task(cid: str) -> EvalResult:
            metrics = self.client_fn(cid).evaluate(state, instructions[cid])
            return EvalResult(cid, int(metrics.get("num_examples", 0)), metrics)

        return [self._guarded(cid, task) for cid in instructions]

    def _fit_one(self, cid: str, state: State, config: Config, transforms: Sequence[Transform], crash: bool) -> Update:
        if crash:
            raise InjectedCrash("injected: client crashed during local training")
        return run_fit(self.client_fn(cid), state, config, transforms)

    @staticmethod
    def _guarded(cid: str, task: Callable[[str], Update | EvalResult]) -> Update | EvalResult | Failure:
        try:
            return task(cid)
        except Exception as exc:  # a client's fault must never stop the round
            log.info("client %s failed: %s: %s", cid, type(exc).__name__, exc)
            return Failure(cid, "crash", f"{type(exc).__name__}: {exc}")
