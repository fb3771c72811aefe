"""Buffered asynchronous training (FedBuff, Nguyen et al. 2022): a second driver beside the round loop.

Clients train continuously on the model version they were given. Follow one update: `_fill` keeps
`concurrency` clients busy, each on the current model (version v); the `Executor` brings back results as
they finish; `_accept` validates each one (`usable_problem`), drops it if its staleness s (server steps since
version v) exceeds `max_staleness`, and buffers it with its weight capped at `max_examples`. When `buffer_size` (K) results are buffered, `_flush` runs
the same path as a synchronous round: transforms' `server` halves, the anomaly checks, then each delta is
scaled by the staleness weight w(s) and `Strategy.aggregate`, the transforms' `finalize` halves and
`Strategy.apply` (the strategy's server optimizer) make the next version. One flush is one server step: one
record committed to the run store, with the in-flight tasks and the clock, so a resumed run continues exactly.

Where results come from is the executor's business: `VirtualExecutor` (simulation, seeded virtual clock) or
`ThreadExecutor` (any real pool, wall-clock time). A `durable` executor (a deployment's, whose clients outlive
the server) names each task with a nonce before it is sent, and the driver writes the tasks it is owed
(in flight, or answered but not yet aggregated) to the store whenever that set changes: a restarted server
sends them again with the same nonce and model version, so their results are accepted with their true
staleness instead of being lost.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from ..audit.record import update_hashes
from ..metrics import MetricAggregation, weighted_mean_metrics
from ..params import Layout
from ..strategies.base import Strategy
from ..transforms.base import StopRun, Transform
from ..types import Config, Failure, Metrics, State, Update
from .anomaly import AnomalyChecks
from .pool import ClientPool
from .round_loop import CentralEval, History, RoundCallback, RoundFailedError, federated_evaluation
from .sampling import client_seed
from .store import RoundEvidence, RoundRecord, RunStore
from .validate import MAX_COUNT, capped, usable_problem

log = logging.getLogger(__name__)

DRIVER_STATE = "async_driver"  # run-store meta key, written in the same transaction as each step


# ----- staleness weights: w(0) = 1, non-increasing in the staleness s
def staleness_weight(kind: str = "sqrt", exponent: float = 0.5) -> Callable[[int], float]:
    """w(s) for the buffered aggregate: "sqrt" 1/sqrt(1+s) (FedBuff's default), "polynomial" (1+s)^-exponent,
    "constant" 1."""
    if kind == "sqrt":
        return lambda s: 1.0 / math.sqrt(1.0 + s)
    if kind in ("polynomial", "poly"):
        if exponent < 0:
            raise ValueError(f"polynomial staleness exponent must be >= 0, got {exponent}")
        return lambda s: (1.0 + s) ** -exponent
    if kind == "constant":
        return lambda s: 1.0
    raise ValueError(f"unknown staleness weighting {kind!r}; choose 'sqrt', 'poly' (polynomial) or 'constant'")


@dataclass(frozen=True)
class AsyncSettings:
    """The knobs of a FedBuff run (see `AsyncServer`), e.g. for a deployment server in asynchronous mode."""

    buffer_size: int = 10
    concurrency: int = 20
    staleness: str = "sqrt"
    staleness_exponent: float = 0.5
    max_staleness: int | None = None
    eval_every: int = 1

    def server_args(self) -> dict:
        """Keyword arguments of `AsyncServer`."""
        return {"buffer_size": self.buffer_size, "concurrency": self.concurrency, "max_staleness": self.max_staleness,
                "staleness": staleness_weight(self.staleness, self.staleness_exponent), "eval_every": self.eval_every}


@dataclass
class Task:
    """One client's work in flight: trained from model `version` (so it answers for step `version + 1`),
    sent at `sent_at`; `seq` orders tasks sent at the same instant. `finish_at` and `lost_at` are set by a
    virtual executor when it schedules the result."""

    client_id: str
    version: int
    seq: int
    sent_at: float
    config: Config
    finish_at: float = 0.0
    lost_at: float | None = None
    nonce: str = ""  # hex, named by a durable executor before the task is sent


class Executor(Protocol):
    """Where asynchronous tasks run and when their results come back."""

    now: float
    pool: ClientPool  # where tasks run; federated evaluation asks its clients too
    durable: bool  # tasks outlive this server: name each with `new_nonce` and keep the owed ones in the store

    def new_nonce(self) -> str:
        """A fresh task nonce (hex); only durable executors are asked."""

    def idle(self, busy: set[str]) -> list[str]:
        """Clients that could take a task now (in pool order), excluding `busy` ones."""

    def start(self, task: Task, state: State, transforms: Sequence[Transform]) -> None:
        """Send `task` with model `state`."""

    def wait(self) -> list[tuple[Task, Update | Failure]] | None:
        """The results finishing next (all those at the same instant), or None when time moved on without one."""

    def resume(self, task: Task, state: State, transforms: Sequence[Transform]) -> bool:
        """Put a task that was in flight at the last committed step (or, for a durable executor, owed when the
        server stopped) back in flight; False if that is impossible."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class AsyncServer:
    """FedBuff over any pool through an `Executor`; the arguments not listed here are those of `Server`.

    `buffer_size` (K): results per server step; `concurrency`: clients training at once; `staleness`: w(s),
    see `staleness_weight`; `max_staleness`: results older than this many steps are dropped (None keeps all).
    `eval_every`: central / federated evaluation every that many steps (and at the last); federated evaluation
    asks `eval_clients` clients of the executor's pool and combines their metrics by `evaluate_metrics` (the
    app's rule, as in the round loop). `fit_config` is sent with
    every task (the app's training settings), under the step's own instructions.
    """

    def __init__(
        self,
        executor: Executor,
        strategy: Strategy,
        initial_state: State,
        *,
        buffer_size: int = 10,
        concurrency: int = 20,
        staleness: Callable[[int], float] | None = None,
        max_staleness: int | None = None,
        transforms: Sequence[Transform] = (),
        anomaly_checks: AnomalyChecks | None = None,
        central_eval: CentralEval | None = None,
        eval_every: int = 1,
        eval_clients: int = 0,
        evaluate_metrics: MetricAggregation = weighted_mean_metrics,
        store: RunStore | None = None,
        seed: int = 0,
        max_examples: int | None = None,
        fit_config: Config | None = None,
    ) -> None:
        if buffer_size < 1 or concurrency < 1:
            raise ValueError(f"buffer_size and concurrency must be >= 1, got {buffer_size} and {concurrency}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        if eval_every < 1 or eval_clients < 0:
            raise ValueError(f"eval_every must be >= 1 and eval_clients >= 0, got {eval_every} and {eval_clients}")
        if max_examples is not None and not 1 <= max_examples <= MAX_COUNT:
            raise ValueError(f"max_examples must be in [1, 2**53], got {max_examples}")
        if strategy.client_extras:
            raise ValueError(f"strategy {strategy.name!r} needs {', '.join(strategy.client_extras)} from every "
                             "client of a synchronous round (control variates); use it with the round loop, or "
                             "pick fedavg, fedprox or a FedOpt strategy for asynchronous training")
        for transform in transforms:
            transform.check_chain(transforms, None)
        self.executor, self.strategy = executor, strategy
        self.layout = Layout.of(initial_state)
        self.params = self.layout.flatten(initial_state)
        self.buffer_size, self.concurrency = buffer_size, concurrency
        self.weight = staleness or staleness_weight()
        self.max_staleness = max_staleness
        self.transforms, self.anomaly_checks = list(transforms), anomaly_checks
        self.central_eval, self.eval_every = central_eval, eval_every
        self.eval_clients, self.evaluate_metrics = eval_clients, evaluate_metrics
        self.store, self.seed, self.max_examples = store, seed, max_examples
        self.fit_config = dict(fit_config or {})
        self.step = 0
        self.history = History()
        self.stop_reason = ""
        self.inflight: dict[int, Task] = {}  # seq -> task
        self._buffer: list[tuple[Update, int, Task]] = []  # (update, staleness, its task)
        self._failures: list[Failure] = []
        self._given: dict[str, int] = {}  # tasks given per client at the current version (distinct seeds)
        self._seq = 0
        self._mid_batch = False  # a step was committed while results of the same instant were still untaken
        self._durable = bool(getattr(executor, "durable", False))
        if store is not None:
            self._restore_or_init(store, initial_state)

    @property
    def state(self) -> State:
        """The current global model."""
        return self.layout.unflatten(self.params)

    @property
    def round(self) -> int:
        """Server steps completed (what the round loop calls rounds; progress bars and status read it)."""
        return self.step

    # ----- the driver
    def run(self, steps: int, callbacks: Sequence[RoundCallback] = (), *, until: float | None = None) -> History:
        """Run until `steps` server steps have completed in total (or virtual/wall time `until` has passed)."""
        try:
            while self.step < steps and (until is None or self.executor.now < until):
                if not self._mid_batch:
                    self._fill()
                arrived = self.executor.wait() or []
                for i, (task, result) in enumerate(arrived):
                    del self.inflight[task.seq]
                    self._accept(task, result)
                    self._save_owed()
                    if len(self._buffer) >= self.buffer_size:
                        # results of the same instant not yet taken stay in flight in the committed state
                        self._mid_batch = i < len(arrived) - 1
                        record = self._flush(final=self.step + 1 >= steps)
                        for callback in callbacks:
                            callback(record)
                self._mid_batch = False
        except StopRun as exc:
            self.stop_reason = str(exc)
            log.warning("run stopped after step %d: %s", self.step, exc)
        return self.history

    def _fill(self) -> None:
        """Send tasks until `concurrency` clients are busy (or no idle client is left), on the current model.
        Which idle clients get them is seeded by (seed, step, seq), so a resumed run picks the same ones."""
        free = self.concurrency - len(self.inflight)
        if free <= 0:
            return
        idle = self.executor.idle({t.client_id for t in self.inflight.values()})
        if not idle:
            return
        rng = np.random.default_rng([self.seed, self.step, self._seq, 3])
        chosen = sorted(rng.choice(len(idle), size=min(free, len(idle)), replace=False))
        state = self.state
        settings = {k: v for t in self.transforms for k, v in t.configure(self.step + 1).items()}
        tasks = []
        for i in chosen:
            cid = idle[i]
            task = Task(cid, self.step, self._seq, self.executor.now, self._config(cid, settings))
            if self._durable:
                task.nonce = self.executor.new_nonce()
            self._seq += 1
            self.inflight[task.seq] = task
            tasks.append(task)
        self._save_owed()  # before sending: a result may come back to a restarted server
        for task in tasks:
            self.executor.start(task, state, self.transforms)

    def _config(self, cid: str, settings: Config) -> Config:
        """What a client is told: as in a round for step `step + 1`, with a distinct shuffle seed for each
        task the client gets from the same version."""
        rnd = self.step + 1
        nth = self._given.get(cid, 0)
        self._given[cid] = nth + 1
        seed = client_seed(self.seed, rnd, cid if nth == 0 else f"{cid}#{nth}")
        return {**self.fit_config, **self.strategy.configure_fit(rnd, cid), **settings, "round": rnd, "seed": seed}

    def _accept(self, task: Task, result: Update | Failure) -> None:
        """Validate one result and buffer it with its staleness, or record why it was not used. So many
        unusable results without a step that no step is coming stop the run with `RoundFailedError`."""
        limit = 10 * (self.buffer_size + self.concurrency)
        if len(self._failures) >= limit:
            reasons = "; ".join(f"{f.client_id}: {f.reason}" for f in self._failures[-3:])
            raise RoundFailedError(f"{len(self._failures)} results in a row were unusable after step {self.step} "
                                   f"(last: {reasons})")
        if isinstance(result, Failure):
            self._failures.append(result)
            return
        staleness = self.step - task.version
        problem = usable_problem(result, self.strategy, expected_client=task.client_id, rnd=task.version + 1,
                                 size=self.layout.size)
        if problem is not None:
            self._failures.append(Failure(task.client_id, "rejected", f"update rejected: {problem}"))
        elif self.max_staleness is not None and staleness > self.max_staleness:
            self._failures.append(Failure(task.client_id, "straggler", (
                f"stale: trained on version {task.version}, {staleness} steps behind (max_staleness "
                f"{self.max_staleness})")))
        elif result.partial and not self.strategy.accept_partial:
            self._failures.append(Failure(task.client_id, "straggler", f"partial work dropped by {self.strategy.name}"))
        else:
            self._buffer.append((capped(result, self.max_examples), staleness, task))

    def _flush(self, final: bool = False) -> RoundRecord:
        """One server step from the buffered results; committed to the store."""
        step = self.step + 1
        staleness = {id(u): s for u, s, _ in self._buffer}
        updates, failures = [u for u, _, _ in self._buffer], self._failures
        self._buffer, self._failures = [], []
        for transform in self.transforms:
            updates, refused = transform.server(updates, step)
            failures += refused
        if self.anomaly_checks is not None:
            updates, flagged = self.anomaly_checks.screen(updates, self.layout.size)
            failures += flagged
        used = [staleness.get(id(u), 0) for u in updates]
        evidence = RoundEvidence(update_hashes(updates))  # as received, before the staleness weight
        if updates:
            weighted = [_scaled(u, self.weight(s)) for u, s in zip(updates, used)]
            self.strategy.begin_round(step, self.params)
            delta = self.strategy.aggregate(weighted)
            for transform in self.transforms:
                delta = transform.finalize(delta, weighted, step)
            # round to the model's dtypes, as the round loop does: memory, clients and store hold one model
            self.params = self.layout.flatten(self.layout.unflatten(self.strategy.apply(self.params, delta)))
        self.step, self._given = step, {}
        metrics = self._metrics(updates, failures, used, final)
        for transform in self.transforms:
            metrics.update(transform.report(step))
        record = RoundRecord(step, metrics, [u.client_id for u in updates], failures)
        if self.store is not None:
            self.store.commit_round(step, self.state, self.strategy.state_dict(), metrics, record.participants,
                                    failures, meta={DRIVER_STATE: self._driver_state()}, evidence=evidence)
        self.history.rounds.append(record)
        return record

    def _metrics(self, updates: list[Update], failures: list[Failure], staleness: list[int], final: bool) -> Metrics:
        metrics: Metrics = {"clients_used": float(len(updates)), "clients_failed": float(len(failures)),
                            "clients_flagged": float(sum(f.kind == "flagged" for f in failures)),
                            "clients_stale": float(sum(f.reason.startswith("stale") for f in failures)),
                            "staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
                            "staleness_max": float(max(staleness, default=0)),
                            "clock": float(self.executor.now)}
        losses = [u.metrics["train_loss"] for u in updates if "train_loss" in u.metrics]
        if updates and len(losses) == len(updates):
            metrics["train_loss"] = float(np.average(losses, weights=[u.num_examples for u in updates]))
        if final or self.step % self.eval_every == 0:
            if self.central_eval is not None:
                metrics.update({f"test_{k}": float(v) for k, v in self.central_eval(self.state).items()
                                if k != "num_examples"})
            if self.eval_clients > 0:
                metrics.update(federated_evaluation(self.executor.pool, self.state, self.step, self.eval_clients,
                                                    self.seed, self.evaluate_metrics))
        return metrics

    # ----- exact resume
    def _driver_state(self) -> dict:
        """What resumes the driver: at a committed step, the tasks in flight; for a durable executor between
        steps, also those answered but not yet aggregated (their results died with the server's memory)."""
        owed = [*self.inflight.values(), *(t for _, _, t in self._buffer)]
        return {"seq": self._seq, "mid_batch": self._mid_batch, "given": dict(self._given),
                "executor": self.executor.state_dict(), "inflight": [asdict(t) for t in owed]}

    def _save_owed(self) -> None:
        """For a durable executor: the tasks owed now, over the last committed step's driver state."""
        if self._durable and self.store is not None:
            self.store.set_meta(DRIVER_STATE, self._driver_state())

    def _restore_or_init(self, store: RunStore, initial_state: State) -> None:
        last = store.last_round()
        if last is None:
            store.commit_round(0, initial_state, self.strategy.state_dict(), {}, [], [],
                               meta={DRIVER_STATE: self._driver_state()})
            return
        saved = store.get_meta(DRIVER_STATE)
        if saved is None:
            raise ValueError(f"{store.path} holds a synchronous run (no asynchronous driver state); resume it "
                             "with the round loop, or start the asynchronous run in a new run directory")
        state, strategy_state = store.load_round(last)
        self.params = self.layout.flatten(state)
        self.strategy.load_state_dict(strategy_state)
        self.step = last
        self.history = History(store.history())
        for transform in self.transforms:
            transform.restore(self.history.rounds)
        self._seq, self._mid_batch = int(saved["seq"]), bool(saved["mid_batch"])
        self._given = {str(k): int(v) for k, v in saved["given"].items()}
        self.executor.load_state_dict(saved["executor"])
        models: dict[int, State] = {}
        for raw in saved["inflight"]:
            task = Task(**raw)
            if task.version > last:
                log.warning("task %d of client %s trained on version %d, which was never committed: dropped",
                            task.seq, task.client_id, task.version)
                continue
            if task.version not in models:
                models[task.version] = store.load_round(task.version)[0]
            if self.executor.resume(task, models[task.version], self.transforms):
                self.inflight[task.seq] = task
        log.info("resumed asynchronous run at step %d of %s (%d tasks back in flight)", last, store.path,
                 len(self.inflight))


def _scaled(update: Update, weight: float) -> Update:
    """`update` with its delta multiplied by the staleness weight (the update itself is left as it is)."""
    if weight == 1.0:
        return update
    return Update(update.client_id, update.round, update.delta * weight, update.num_examples, update.metrics,
                  update.partial, update.extras)


class ThreadExecutor:
    """Real time over any thread-safe pool (e.g. `RemotePool`): each task is a one-client `pool.fit` in its own
    thread, so a slow client holds only its own slot. The first look for idle clients waits as the pool's
    `client_ids` does (for enough clients to connect); later ones take `connected()` (the clients connected
    right now, without waiting) when given, so clients may join and leave during the run. Tasks in flight
    when a server stops are lost (their clients get new ones after a restart); a deployment's
    `RemoteExecutor` resumes them instead."""

    durable = False

    def __init__(self, pool: ClientPool, connected: Callable[[], Sequence[str]] | None = None,
                 poll_seconds: float = 1.0) -> None:
        self.pool, self.connected, self.poll_seconds = pool, connected, poll_seconds
        self._start, self._offset = time.monotonic(), 0.0
        self._waited = False
        self._results: queue.Queue[tuple[Task, Update | Failure]] = queue.Queue()

    @property
    def now(self) -> float:
        return self._offset + time.monotonic() - self._start

    def idle(self, busy: set[str]) -> list[str]:
        ids = self.connected() if self._waited and self.connected is not None else self.pool.client_ids
        self._waited = True
        return [c for c in ids if c not in busy]

    def start(self, task: Task, state: State, transforms: Sequence[Transform]) -> None:
        self._launch(task, lambda: self.pool.fit(state, {task.client_id: task.config}, transforms)[0])

    def _launch(self, task: Task, fit: Callable[[], Update | Failure]) -> None:
        """Run `fit` in its own thread; its result (or the pool's fault) arrives through `wait`."""
        def work() -> None:
            try:
                result = fit()
            except Exception as exc:  # a pool fault costs this task, never the run
                result = Failure(task.client_id, "crash", f"{type(exc).__name__}: {exc}")
            self._results.put((task, result))

        threading.Thread(target=work, name=f"async-task-{task.seq}", daemon=True).start()

    def wait(self) -> list[tuple[Task, Update | Failure]] | None:
        try:
            first = self._results.get(timeout=self.poll_seconds)
        except queue.Empty:
            return None
        arrived = [first]
        while not self._results.empty():
            arrived.append(self._results.get_nowait())
        return arrived

    def resume(self, task: Task, state: State, transforms: Sequence[Transform]) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"now": self.now}

    def load_state_dict(self, state: dict) -> None:
        self._start, self._offset = time.monotonic(), float(state["now"])
