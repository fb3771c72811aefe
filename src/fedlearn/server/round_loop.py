"""The round loop: sample -> dispatch -> validate -> transform -> aggregate -> server step -> evaluate -> commit.

One loop for every client pool. Follow one update: `ClientPool.fit` returns it, `update_problem` checks it,
the strategy's `accept_partial` decides on stragglers, transforms' `server` halves see it, the anomaly checks
screen it (`anomaly.py`), `Strategy.aggregate` combines it, transforms' `finalize` halves adjust the aggregate,
and `Strategy.apply` makes the new model.

Dispatch and aggregation go through the round's `RoundProtocol` (`protocol.py`): by default one fit exchange
and `Strategy.aggregate`; secure aggregation runs its stages there as generic messages (`ClientPool.exchange`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..metrics import MetricAggregation, weighted_mean_metrics
from ..params import Layout
from ..strategies.base import Strategy
from ..transforms.base import StopRun, Transform
from ..types import Config, EvalResult, Failure, Metrics, State, Update
from .anomaly import AnomalyChecks
from .pool import ClientPool
from .protocol import RoundProtocol
from .sampling import ClientSampler, client_seed
from .store import RoundRecord, RunStore
from .validate import update_problem

log = logging.getLogger(__name__)

CentralEval = Callable[[State], Metrics]
RoundCallback = Callable[[RoundRecord], None]


class RoundFailedError(RuntimeError):
    """Too many consecutive rounds had fewer than `min_clients` usable updates."""


@dataclass
class History:
    """Every completed round of a run, in order: `rounds[i]` is a `RoundRecord` (round number, metrics,
    participants, failures with reasons). The metric names are listed in `fedlearn.metrics`
    (``test_accuracy`` for the server's evaluation, ``fed_accuracy`` for the clients', ...)."""

    rounds: list[RoundRecord] = field(default_factory=list)

    def metric(self, name: str) -> list[float]:
        """The values of metric `name` over the rounds that recorded it, in round order. A name no round
        recorded raises `KeyError` listing the names that exist."""
        values = [r.metrics[name] for r in self.rounds if name in r.metrics]
        if not values and self.rounds:
            known = sorted({k for r in self.rounds for k in r.metrics})
            raise KeyError(f"no round recorded metric {name!r}; recorded metrics: {', '.join(known)} "
                           "(names are listed in fedlearn.metrics)")
        return values

    @property
    def last(self) -> dict[str, float]:
        """The metrics of the last completed round (empty before the first)."""
        return self.rounds[-1].metrics if self.rounds else {}


class Server:
    """Runs federated rounds over any `ClientPool`, committing each completed round to an optional store."""

    def __init__(
        self,
        pool: ClientPool,
        strategy: Strategy,
        initial_state: State,
        *,
        sampler: ClientSampler,
        min_clients: int = 1,
        transforms: Sequence[Transform] = (),
        central_eval: CentralEval | None = None,
        eval_clients: int = 0,
        store: RunStore | None = None,
        seed: int = 0,
        max_failed_rounds: int = 3,
        anomaly_checks: AnomalyChecks | None = None,
        protocol: RoundProtocol | None = None,
        fit_config: Config | None = None,
        evaluate_metrics: MetricAggregation = weighted_mean_metrics,
    ) -> None:
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if max_failed_rounds < 0:
            raise ValueError(f"max_failed_rounds must be >= 0, got {max_failed_rounds}")
        self.pool, self.strategy, self.sampler = pool, strategy, sampler
        self.layout = Layout.of(initial_state)
        self.params = self.layout.flatten(initial_state)
        self.min_clients, self.transforms = min_clients, list(transforms)
        self.central_eval, self.eval_clients = central_eval, eval_clients
        self.store, self.seed, self.max_failed_rounds = store, seed, max_failed_rounds
        self.anomaly_checks = anomaly_checks
        self.fit_config, self.evaluate_metrics = dict(fit_config or {}), evaluate_metrics
        self.protocol = protocol or RoundProtocol()
        self.protocol.check(strategy)
        self.stop_reason = ""
        self.round = 0
        self.history = History()
        if store is not None:
            self._restore_or_init(store, initial_state)

    @property
    def state(self) -> State:
        """The current global model."""
        return self.layout.unflatten(self.params)

    def _restore_or_init(self, store: RunStore, initial_state: State) -> None:
        last = store.last_round()
        if last is None:
            store.commit_round(0, initial_state, self.strategy.state_dict(), {}, [], [])
            return
        state, strategy_state = store.load_round(last)
        self.params = self.layout.flatten(state)
        self.strategy.load_state_dict(strategy_state)
        self.round = last
        self.history = History(store.history())
        for transform in self.transforms:
            transform.restore(self.history.rounds)
        log.info("resumed from round %d of %s", last, store.path)

    def run(self, rounds: int, callbacks: Sequence[RoundCallback] = ()) -> History:
        """Run until `rounds` rounds have completed in total (a resumed run continues where it stopped).

        A round with fewer than `min_clients` usable updates leaves the model unchanged and is recorded as
        failed; more than `max_failed_rounds` such rounds in a row stop the run with `RoundFailedError`.
        """
        failed_in_a_row = 0
        while self.round < rounds:
            try:
                record = self.run_round(self.round + 1)
            except StopRun as exc:
                self.stop_reason = str(exc)
                log.warning("run stopped after round %d: %s", self.round, exc)
                break
            for callback in callbacks:
                callback(record)
            failed_in_a_row = failed_in_a_row + 1 if record.metrics.get("round_failed") else 0
            if failed_in_a_row > self.max_failed_rounds:
                raise RoundFailedError(
                    f"{failed_in_a_row} rounds in a row failed (max_failed_rounds={self.max_failed_rounds}); "
                    f"last: {record.note}"
                )
        return self.history

    def run_round(self, rnd: int) -> RoundRecord:
        """One complete round, committed to the store; a failed round (too few usable updates) keeps the model."""
        started = time.perf_counter()
        state = self.state
        settings = {k: v for transform in self.transforms for k, v in transform.configure(rnd).items()}
        cohort = self.sampler.sample(self.pool.client_ids, rnd)
        instructions = {
            cid: {**self.fit_config, **self.strategy.configure_fit(rnd, cid), **settings, "round": rnd,
                  "seed": client_seed(self.seed, rnd, cid)}
            for cid in cohort
        }
        results = self.protocol.collect(self.pool, state, instructions, self.transforms)
        updates, failures = self._screen(results, instructions, rnd)
        for transform in self.transforms:
            updates, refused = transform.server(updates, rnd)
            failures += refused
        if self.anomaly_checks is not None:
            updates, flagged = self.anomaly_checks.screen(updates, self.layout.size)
            failures += flagged
        for f in failures:
            log.info("round %d: client %s %s: %s", rnd, f.client_id, f.kind, f.reason)
        note = ""
        if len(updates) >= self.min_clients:
            self.strategy.begin_round(rnd, self.params)
            delta = self.protocol.aggregate(self.pool, self.strategy, updates, rnd)
            for transform in self.transforms:
                delta = transform.finalize(delta, updates, rnd)
            # The global model is the state in its own dtypes: round the float64 step to them, so the model
            # in memory is exactly what clients receive and what the store (and so a resumed run) holds.
            self.params = self.layout.flatten(self.layout.unflatten(self.strategy.apply(self.params, delta)))
        else:
            reasons = "; ".join(f"{f.client_id}: {f.reason}" for f in failures[:3])
            note = (f"round {rnd}: only {len(updates)} of {len(cohort)} sampled clients returned usable updates, "
                    f"min_clients is {self.min_clients}; model unchanged ({reasons})")
            log.warning(note)
            updates = []
        metrics = self._round_metrics(updates, failures, cohort, rnd)
        for transform in self.transforms:
            metrics.update(transform.report(rnd))
        if note:
            metrics["round_failed"] = 1.0
        record = RoundRecord(rnd, metrics, [u.client_id for u in updates], failures, note)
        if self.store is not None:
            self.store.commit_round(rnd, self.state, self.strategy.state_dict(), metrics, record.participants, failures)
        record.seconds = time.perf_counter() - started
        self.round = rnd
        self.history.rounds.append(record)
        return record

    def _screen(self, results: list[Update | Failure], instructions: dict, rnd: int) -> tuple[list[Update], list[Failure]]:
        """Split pool results into usable updates and failures with reasons (validation and stragglers)."""
        updates: list[Update] = []
        failures: list[Failure] = []
        answered = set()
        for result in results:
            if isinstance(result, Failure):
                failures.append(result)
                answered.add(result.client_id)
                continue
            expected = result.client_id if result.client_id in instructions else "<not sampled>"
            problem = update_problem(result, expected_client=expected, rnd=rnd, size=self.layout.size)
            if problem is None and result.client_id in answered:
                problem = "sent more than one update this round"
            answered.add(result.client_id)
            if problem is not None:
                failures.append(Failure(result.client_id, "rejected", f"update rejected: {problem}"))
            elif result.partial and not self.strategy.accept_partial:
                failures.append(Failure(result.client_id, "straggler",
                                        f"partial work dropped by {self.strategy.name}"))
            else:
                updates.append(result)
        failures += [Failure(c, "timeout", "no result before the round ended") for c in instructions if c not in answered]
        return updates, failures

    def _round_metrics(self, updates: list[Update], failures: list[Failure], cohort: list[str], rnd: int) -> Metrics:
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        metrics: Metrics = {"clients_sampled": float(len(cohort)), "clients_used": float(len(updates)),
                            "clients_failed": float(len(failures)),
                            "clients_flagged": float(sum(f.kind == "flagged" for f in failures))}
        train_losses = [u.metrics["train_loss"] for u in updates if "train_loss" in u.metrics]
        if updates and len(train_losses) == len(updates):
            metrics["train_loss"] = float(np.average(train_losses, weights=weights))
        state = self.state
        if self.central_eval is not None:
            metrics.update({f"test_{k}": float(v) for k, v in self.central_eval(state).items() if k != "num_examples"})
        if self.eval_clients > 0:
            metrics.update(self._federated_eval(state, rnd))
        return metrics

    def _federated_eval(self, state: State, rnd: int) -> Metrics:
        ids = self.pool.client_ids
        rng = np.random.default_rng([self.seed, rnd, 1])
        chosen = [ids[i] for i in np.sort(rng.choice(len(ids), size=min(self.eval_clients, len(ids)), replace=False))]
        results = [r for r in self.pool.evaluate(state, {c: {"round": rnd} for c in chosen}) if isinstance(r, EvalResult)]
        return {f"fed_{k}": float(v) for k, v in self.evaluate_metrics(results).items()}
