"""Sequential in-process client pool: clients are built on demand by `client_fn`, one at a time."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

from ..analytics.summary import STATISTICS_KEY, SUMMARY, answer_summary
from ..client import Client, run_fit
from ..messages import ClientSession, Handler, Message
from ..server.pool import ClientPool
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update
from .deadline import run_with_deadline
from .faults import FaultInjector, InjectedCrash, InjectedDrop

log = logging.getLogger(__name__)

ClientFn = Callable[[str], Client]


class InProcessPool(ClientPool):
    """Runs each client's task in this process. Client objects are created per task by `client_fn(cid)`
    and dropped afterwards, so memory grows with the cohort, not with the number of clients.
    `handlers` (message kind -> handler) answer the stages of multi-exchange protocols; each client's
    memory across those stages is kept here, as a device would keep it."""

    def __init__(
        self,
        client_fn: ClientFn,
        client_ids: Sequence[str],
        faults: FaultInjector | None = None,
        handlers: Mapping[str, Handler] | None = None,
    ) -> None:
        if not client_ids:
            raise ValueError("a client pool needs at least one client id")
        self.client_fn = client_fn
        self._ids = [str(c) for c in client_ids]
        self.faults = faults or FaultInjector()
        self.handlers = {SUMMARY: answer_summary, **dict(handlers or {})}  # every client answers statistics
        self._memory: dict[str, dict] = {}

    @property
    def client_ids(self) -> Sequence[str]:
        return self._ids

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        return list(self._fit_each(state, instructions, transforms))

    def fit_iter(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> Iterator[Update | Failure]:
        if type(self).fit is not InProcessPool.fit:  # a subclass trains the cohort its own way (all at once)
            return super().fit_iter(state, instructions, transforms)
        return self._fit_each(state, instructions, transforms)

    def _fit_each(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform]
    ) -> Iterator[Update | Failure]:
        for cid, config in instructions.items():
            yield self._guarded(cid, lambda c, config=config: self._fit_one(c, state, config, transforms))

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        def task(cid: str) -> EvalResult:
            metrics = self.client_fn(cid).evaluate(state, instructions[cid])
            return EvalResult(cid, int(metrics.get("num_examples", 0)), metrics)

        return [self._guarded(cid, task) for cid in instructions]

    def exchange(
        self,
        messages: Mapping[str, Message],
        *,
        state: State | None = None,
        transforms: Sequence[Transform] = (),
        deadline: float | None = None,
    ) -> dict[str, Message | Failure]:
        """Run each client's registered handler in this process. Clients would answer in parallel, so the
        `deadline` applies to each handler on its own; one that overruns is abandoned as a timeout."""
        replies: dict[str, Message | Failure] = {}
        for cid, message in messages.items():
            handler = self.handlers.get(message.kind)
            if handler is None:
                replies[cid] = Failure(cid, "rejected", f"client has no handler for stage {message.kind!r}")
                continue
            session = ClientSession(cid, self._memory.setdefault(cid, {}), self._trainer(cid, state, transforms))
            # bind this iteration's values: an abandoned (timed-out) handler thread must not see the next ones
            replies[cid] = self._guarded(
                cid, lambda c, h=handler, s=session, m=message: run_with_deadline(lambda: h(s, m), deadline))
        return replies

    def _trainer(self, cid: str, state: State | None, transforms: Sequence[Transform]) -> Callable[[Config], Update]:
        def fit(config: Config) -> Update:
            if state is None and STATISTICS_KEY not in config:  # a statistics task needs no model
                raise RuntimeError("this protocol stage carried no model to train")
            return self._fit_one(cid, state, config, transforms)

        return fit

    def _fit_one(self, cid: str, state: State, config: Config, transforms: Sequence[Transform]) -> Update:
        return run_fit(self.client_fn(cid), state, self._inject_fault(cid, config), transforms)

    def _inject_fault(self, cid: str, config: Config) -> Config:
        """Apply this client's seeded fate: raise for a drop or crash, else its config (with ``work_fraction``
        for a straggler). Pools that train elsewhere call it too, so every engine injects the same faults."""
        fate, fraction = self.faults.decide(int(config.get("round", 0)), cid)
        if fate == "drop":
            raise InjectedDrop("injected: client dropped out and never answered")
        if fate == "crash":
            raise InjectedCrash("injected: client crashed during local training")
        return {**config, "work_fraction": fraction} if fraction < 1.0 else config

    @staticmethod
    def _guarded(cid: str, task: Callable[[str], Update | EvalResult | Message]) -> Update | EvalResult | Message | Failure:
        try:
            return task(cid)
        except InjectedDrop as exc:
            return Failure(cid, "drop", str(exc))
        except TimeoutError as exc:
            return Failure(cid, "timeout", str(exc))
        except Exception as exc:  # a client's fault must never stop the round
            log.info("client %s failed: %s: %s", cid, type(exc).__name__, exc)
            return Failure(cid, "crash", f"{type(exc).__name__}: {exc}")
