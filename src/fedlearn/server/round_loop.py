"""The round loop: sample -> dispatch -> validate -> transform -> aggregate -> server step -> evaluate -> commit.

One loop for every client pool. Follow one update: `ClientPool.fit` returns it, `update_problem` checks it
(and every value in it; the strategy's own `update_problem` what it needs), its example weight is capped at
`max_examples`, the strategy's `accept_partial` decides on stragglers, transforms' `server` halves see it, the anomaly checks
screen it (`anomaly.py`), `Strategy.aggregate` combines it, transforms' `finalize` halves adjust the aggregate,
and `Strategy.apply` makes the new model. The store commits the round with its evidence: each accepted
update's hash for the audit log and, with `contributions`, each client's contribution scores.

Dispatch and aggregation go through the round's `RoundProtocol` (`protocol.py`): by default one fit exchange
and `Strategy.aggregate`; secure aggregation runs its stages there as generic messages (`ClientPool.exchange`).
A protocol that cannot finish safely raises `RoundAborted`: the round is recorded as failed with the reason,
the model is unchanged, and the run goes on.

Streaming: when the aggregate is a sum (`Strategy.running_aggregate`: the weighted mean of FedAvg, FedProx,
FedOpt, alone or with per-update transforms such as central DP), the plain protocol runs and nothing needs
the whole round at once, each update is screened, transformed and folded into the running aggregate as the
pool yields it, then dropped: server memory is O(d), not O(n d). Anything that needs every update at once
keeps the stack: a robust aggregator, a strategy with its own `aggregate`, a multi-stage protocol (secure
aggregation holds every masked vector), a transform whose server half looks across updates (simulated
attacks), the anomaly checks (on by default in config-built runs) and contribution scores.
`Server.stacking_reason` says which, or None when the run streams. Updates are hashed for the audit log only
when a store records the round: nothing else reads the hashes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..audit.record import update_digest, update_hashes
from ..contributions.accounting import ContributionAccounting
from ..metrics import MetricAggregation, weighted_mean_metrics
from ..params import Layout
from ..strategies.base import Strategy
from ..transforms.base import StopRun, Transform
from ..types import Config, EvalResult, Failure, Metrics, State, Update
from .anomaly import AnomalyChecks
from .pool import ClientPool
from .protocol import RoundAborted, RoundProtocol
from .sampling import ClientSampler, client_seeds
from .store import RoundEvidence, RoundRecord, RunStore
from .validate import MAX_COUNT, capped, count_problem, metrics_problem, usable_problem

log = logging.getLogger(__name__)

CentralEval = Callable[[State], Metrics]
RoundCallback = Callable[[RoundRecord], None]


class RoundFailedError(RuntimeError):
    """Too many consecutive rounds failed (fewer than `min_clients` usable updates, or an aborted protocol)."""


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
        max_examples: int | None = None,
        contributions: ContributionAccounting | None = None,
        fit_config: Config | None = None,
        evaluate_metrics: MetricAggregation = weighted_mean_metrics,
    ) -> None:
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if max_failed_rounds < 0:
            raise ValueError(f"max_failed_rounds must be >= 0, got {max_failed_rounds}")
        if max_examples is not None and not 1 <= max_examples <= MAX_COUNT:
            raise ValueError(f"max_examples must be in [1, 2**53], got {max_examples}")
        self.pool, self.strategy, self.sampler = pool, strategy, sampler
        self.layout = Layout.of(initial_state)
        self.params = self.layout.flatten(initial_state)
        self.min_clients, self.transforms = min_clients, list(transforms)
        self.central_eval, self.eval_clients = central_eval, eval_clients
        self.store, self.seed, self.max_failed_rounds = None, seed, max_failed_rounds
        self.anomaly_checks, self.max_examples, self.contributions = anomaly_checks, max_examples, contributions
        self.fit_config, self.evaluate_metrics = dict(fit_config or {}), evaluate_metrics
        self.protocol = protocol or RoundProtocol()
        self.protocol.check(strategy)
        for transform in self.transforms:
            transform.check_chain(self.transforms, self.protocol)
        self.stop_reason = ""
        self.round = 0
        self.history = History()
        if store is not None:
            self.attach(store)

    @property
    def stacking_reason(self) -> str | None:
        """Why this run keeps every update of a round in memory (an `(n, d)` stack), or None when it folds each
        update into a running aggregate as it arrives (O(d) server memory)."""
        if self.strategy.running_aggregate() is None:
            aggregator = self.strategy.aggregator
            name = getattr(aggregator, "name", None) or getattr(aggregator, "__name__", type(aggregator).__qualname__)
            return f"strategy {self.strategy.name} with aggregator {name} needs every update at once"
        if type(self.protocol).collect is not RoundProtocol.collect or \
                type(self.protocol).aggregate is not RoundProtocol.aggregate:
            return f"the {self.protocol.name} protocol combines the round's updates itself"
        if self.anomaly_checks is not None:
            return "the anomaly checks compare every update with the round's others"
        if self.contributions is not None:
            return "contribution scores evaluate subsets of the round's updates"
        crowd = [t.name for t in self.transforms if not t.per_update]
        if crowd:
            return f"transforms {', '.join(crowd)} look at the round's updates together (not per_update)"
        return None

    @property
    def state(self) -> State:
        """The current global model."""
        return self.layout.unflatten(self.params)

    def describe(self) -> dict[str, Any]:
        """The settings that make this run what it is (for `RunStore.bind_config` when no config file does):
        strategy and its scalar settings, model layout, sampling, transforms, protocol and checks."""
        aggregator, optimizer = self.strategy.aggregator, self.strategy.server_optimizer
        return {
            "strategy": {"class": type(self.strategy).__qualname__, **_scalars(self.strategy),
                         "client_config": self.strategy.client_config,
                         "aggregator": {"name": getattr(aggregator, "__name__", type(aggregator).__qualname__),
                                        **_scalars(aggregator)},
                         "server_optimizer": {"class": type(optimizer).__qualname__, **_scalars(optimizer)}},
            "model": {name: [list(v.shape), v.dtype.str] for name, v in self.state.items()},
            "sampler": {"class": type(self.sampler).__qualname__, **_scalars(self.sampler)},
            "min_clients": self.min_clients, "max_failed_rounds": self.max_failed_rounds, "seed": self.seed,
            "max_examples": self.max_examples, "eval_clients": self.eval_clients,
            "transforms": [t.name for t in self.transforms], "protocol": self.protocol.name,
            "anomaly_checks": dataclasses.asdict(self.anomaly_checks) if self.anomaly_checks is not None else None,
        }

    def attach(self, store: RunStore) -> None:
        """Commit every round to `store`, resuming the run it holds (or storing the initial model as round 0)."""
        self.store = store
        last = store.last_round()
        if last is None:
            store.commit_round(0, self.state, self.strategy.state_dict(), {}, [], [])
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
        """One complete round, committed to the store; a failed round (too few usable updates, or a protocol
        that aborted) keeps the model."""
        started = time.perf_counter()
        state = self.state
        settings = {k: v for transform in self.transforms for k, v in transform.configure(rnd).items()}
        cohort = self.sampler.sample(self.pool.client_ids, rnd)
        instructions = {
            cid: {**self.fit_config, **self.strategy.configure_fit(rnd, cid), **settings, "round": rnd, "seed": seed}
            for cid, seed in zip(cohort, client_seeds(self.seed, rnd, cohort))
        }
        updates: list[Update] = []
        failures: list[Failure] = []
        note = ""
        evidence = RoundEvidence()
        running = self.strategy.running_aggregate() if self.stacking_reason is None else None
        try:
            if running is not None:
                updates, failures, hashes = self._fold(state, instructions, rnd, running)
            else:
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
            if len(updates) >= self.min_clients:
                if self.store is not None:  # the audit log's evidence; nothing else reads it
                    evidence.update_hashes = hashes if running is not None else update_hashes(updates)
                if self.contributions is not None:
                    evidence.contributions = self.contributions.score(self.layout, self.params, updates, rnd)
                self.strategy.begin_round(rnd, self.params)
                delta = running.result() if running is not None else \
                    self.protocol.aggregate(self.pool, self.strategy, updates, rnd)
                for transform in self.transforms:
                    delta = transform.finalize(delta, updates, rnd)
                # The global model is the state in its own dtypes: round the float64 step to them, so the model
                # in memory is exactly what clients receive and what the store (and so a resumed run) holds.
                self.params = self.layout.flatten(self.layout.unflatten(self.strategy.apply(self.params, delta)))
            else:
                reasons = "; ".join(f"{f.client_id}: {f.reason}" for f in failures[:3])
                note = (f"round {rnd}: only {len(updates)} of {len(cohort)} sampled clients returned usable "
                        f"updates, min_clients is {self.min_clients}; model unchanged ({reasons})")
        except RoundAborted as exc:
            note = f"round {rnd} aborted by the {self.protocol.name} protocol: {exc}"
        if note:
            log.warning(note)
            updates, evidence = [], RoundEvidence()
        metrics = self._round_metrics(updates, failures, cohort, rnd)
        for transform in self.transforms:
            metrics.update(transform.report(rnd))
        metrics.update(self.pool.transport_metrics())  # this round's messages, training and evaluation
        if note:
            metrics["round_failed"] = 1.0
        if evidence.contributions:
            metrics["contribution_evaluations"] = float(self.contributions.last_evaluations)
        record = RoundRecord(rnd, metrics, [u.client_id for u in updates], failures, note)
        if self.store is not None:
            self.store.commit_round(rnd, self.state, self.strategy.state_dict(), metrics, record.participants, failures,
                                    note, evidence=evidence)
        record.seconds = time.perf_counter() - started
        self.round = rnd
        self.history.rounds.append(record)
        return record

    def _screen(self, results: list[Update | Failure], instructions: dict, rnd: int) -> tuple[list[Update], list[Failure]]:
        """Split pool results into usable updates and failures with reasons (validation and stragglers), and
        cap each example weight at `max_examples`."""
        updates: list[Update] = []
        failures: list[Failure] = []
        answered: set[str] = set()
        for result in results:
            screened = self._screen_one(result, instructions, rnd, answered)
            (failures if isinstance(screened, Failure) else updates).append(screened)
        return updates, failures + _timeouts(instructions, answered)

    def _fold(self, state: State, instructions: dict, rnd: int,
              running: Any) -> tuple[list[Update], list[Failure], dict[str, str]]:
        """The streaming round: screen each result as the pool yields it, run the (per-update) server halves of
        the transforms, hash it for the audit log and fold it into `running`; keep only the accepted updates'
        count, weight and metrics (their deltas become empty arrays). Failures come in the stacked path's order."""
        updates: list[Update] = []
        failures: list[Failure] = []
        refused: list[Failure] = []
        hashes: dict[str, str] = {}
        answered: set[str] = set()
        for result in self.pool.fit_iter(state, instructions, self.transforms):
            screened = self._screen_one(result, instructions, rnd, answered)
            if isinstance(screened, Failure):
                failures.append(screened)
                continue
            kept = [screened]
            for transform in self.transforms:
                kept, out = transform.server(kept, rnd)
                refused += out
            for update in kept:
                if self.store is not None:
                    hashes[update.client_id] = update_digest(update)
                running.add(update.delta, update.num_examples)
                updates.append(dataclasses.replace(update, delta=np.empty(0), extras={}))
        return updates, failures + _timeouts(instructions, answered) + refused, hashes

    def _screen_one(self, result: Update | Failure, instructions: dict, rnd: int,
                    answered: set[str]) -> Update | Failure:
        """One pool result as a usable (capped) update or a failure with the reason; `answered` collects the
        clients heard from, so a second update from the same client is refused."""
        if isinstance(result, Failure):
            answered.add(result.client_id)
            return result
        expected = result.client_id if result.client_id in instructions else "<not sampled>"
        problem = usable_problem(result, self.strategy, expected_client=expected, rnd=rnd, size=self.layout.size)
        if problem is None and result.client_id in answered:
            problem = "sent more than one update this round"
        answered.add(result.client_id)
        if problem is not None:
            return Failure(result.client_id, "rejected", f"update rejected: {problem}")
        if result.partial and not self.strategy.accept_partial:
            return Failure(result.client_id, "straggler", f"partial work dropped by {self.strategy.name}")
        return capped(result, self.max_examples)

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
            metrics.update(federated_evaluation(self.pool, state, rnd, self.eval_clients, self.seed,
                                                self.evaluate_metrics))
        return metrics



def federated_evaluation(pool: ClientPool, state: State, rnd: int, eval_clients: int, seed: int,
                         rule: MetricAggregation) -> Metrics:
    """Evaluate `state` on `eval_clients` clients of `pool` (seeded by `seed` and `rnd`) and combine their
    metrics by `rule` (an app's ``evaluate_metrics``) into ``fed_*`` metrics; a result with a bad example count
    or metric is left out with the reason logged. Both drivers (round loop, FedBuff) call it."""
    ids = pool.client_ids
    rng = np.random.default_rng([seed, rnd, 1])
    chosen = [ids[i] for i in np.sort(rng.choice(len(ids), size=min(eval_clients, len(ids)), replace=False))]
    results = [r for r in pool.evaluate(state, {c: {"round": rnd} for c in chosen}) if isinstance(r, EvalResult)]
    usable = []
    for r in results:
        problem = count_problem(r.num_examples, minimum=0) or metrics_problem(r.metrics)
        if problem is not None:
            log.info("round %d: evaluation result of client %s ignored: %s", rnd, r.client_id, problem)
        else:
            usable.append(r)
    return {f"fed_{k}": float(v) for k, v in rule(usable).items()}


def _timeouts(instructions: dict, answered: set[str]) -> list[Failure]:
    """A timeout failure for each sampled client that sent nothing."""
    return [Failure(c, "timeout", "no result before the round ended") for c in instructions if c not in answered]


def _scalars(obj: object) -> dict[str, Any]:
    """The public number, string and flag attributes of `obj` (its settings, not its arrays)."""
    return {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
