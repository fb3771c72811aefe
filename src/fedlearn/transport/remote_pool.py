"""`RemotePool`: a `ClientPool` whose clients are processes connected over the network.

Each connected client holds one authenticated stream (see `service.py`), represented here by a `Session`
with a queue of tasks. `fit`, `evaluate` and `exchange` (one stage of a multi-exchange protocol such as
secure aggregation) put one task per client on those queues and wait until every task is resolved or the
deadline passes. A task is resolved exactly once: by a result that
passes every check in `deliver`, by the connection closing, or by the deadline. Each task carries a fresh
nonce, so a result that is replayed, late, forged, sent for another run or by another client is refused
with the reason, logged, and counted in `rejections`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..audit.receipts import AUDIT_KEY, ReceiptIssuer
from ..compression import Compression, update_codec
from ..compression.downlink import DownlinkServer
from ..params import Layout
from ..messages import Message, decode_message, encode_message
from ..serialize import SerializationError, decode_update, encode_state
from ..server.pool import ClientPool
from ..server.validate import MAX_COUNT, count_problem, metrics_problem
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update
from . import fedlearn_pb2 as pb
from .identity import result_message, verify
from .wire import KIND_NAMES, MAX_MESSAGE_BYTES, NONCE_BYTES, decode_metrics, encode_config

log = logging.getLogger(__name__)

MAX_CLOSED_NONCES = 100_000
RESULT_OVERHEAD = 1 << 20  # room for an update's header and metrics, and for evaluation results
MAX_REPLY_BYTES = 64 << 20  # a protocol stage's reply, unless the stage carries a model
MAX_HEADER_BODY = MAX_MESSAGE_BYTES - (64 << 10)  # config + stage message inside one task header


class NotEnoughClientsError(RuntimeError):
    """Fewer clients connected than a round needs, within the wait timeout."""


@dataclass
class Task:
    """One unit of work for one client in one round."""

    nonce: bytes
    client_id: str
    round: int
    kind: int
    config: bytes
    message: bytes
    payload: bytes
    payload_sha256: bytes
    deadline_seconds: float
    result_limit: int  # largest result payload accepted for this task
    session: "Session"
    codec: Any = None  # how this task's update is packed (fit tasks)
    result: Update | EvalResult | Failure | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    train_seconds: float = 0.0


@dataclass(frozen=True)
class _Body:
    """What one client's task carries besides the shared model."""

    round: int
    config: bytes
    message: bytes = b""


@dataclass
class Rejection:
    """A result the server refused, and why."""

    client_id: str
    round: int
    reason: str
    at: float = field(default_factory=time.time)


@dataclass
class RoundStats:
    """Wire cost of one dispatch (fit or evaluate) of one round."""

    round: int
    kind: str
    clients: int
    seconds: float
    bytes_down: int
    bytes_up: int
    max_train_seconds: float


class Session:
    """One authenticated connection of one client: the stream's handler takes tasks from `next`."""

    def __init__(self, client_id: str, public_hex: str, transforms: Sequence[str], peer: str,
                 cancel: Callable[[], None], audit_size: int = 0) -> None:
        self.client_id, self.public_hex, self.peer = client_id, public_hex, peer
        self.audit_size = audit_size  # the size of the newest audit head the client says it holds
        self.transforms = list(transforms)
        self.cancel = cancel
        self._queue: queue.Queue[Task | str | None] = queue.Queue()
        self.held: int | None = None  # the downlink replica version sent on this connection

    def next(self) -> Task | str | None:
        """Block until the next task, a finish reason (str), or None when the session was closed."""
        return self._queue.get()

    def put(self, item: Task | str | None) -> None:
        self._queue.put(item)


def _round(values: Mapping[str, Any]) -> int:
    """The round a config or stage message names (0 if none), which its task is bound to."""
    value = values.get("round")
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else 0


def _natural_key(client_id: str) -> list[tuple[int, int | str]]:
    """Order "2" before "10" so numbered clients come in the same order as in simulation."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", client_id) if p]


class RemotePool(ClientPool):
    """Clients are remote processes; the round ends when all sampled clients answered or at the deadline.

    Before each round `client_ids` waits for `min_available` connected clients; once `min_clients` are
    connected it waits at most `proceed_after` seconds more and goes on with those it has. With fewer than
    `min_clients` for `wait_timeout` seconds it raises `NotEnoughClientsError`. While waiting it logs what it
    waits for every `log_every` seconds, and `waiting` says how many are connected of how many wanted.
    `fit_config` entries are sent with every fit task (the round's own instructions win). With `receipts`
    (a `fedlearn.audit.receipts.ReceiptIssuer`, told the size of the head each client holds when it connects),
    each fit task, and each protocol stage that trains (secure aggregation's masked-input stage), also carries
    the client's audit receipts under the config key "audit", and so does the message that ends the run
    (`final_audit`). With `downlink` (a compression transform), fit
    tasks carry the compressed changes of the model each connection has not seen yet instead of the model
    (`fedlearn.compression.downlink`: clients train from the replica both sides hold); evaluation tasks
    always carry the model itself.
    """

    def __init__(
        self,
        run_id: str,
        *,
        round_deadline: float = 60.0,
        min_available: int = 1,
        min_clients: int = 1,
        proceed_after: float = 30.0,
        wait_timeout: float = 600.0,
        log_every: float = 10.0,
        fit_config: Config | None = None,
        receipts: ReceiptIssuer | None = None,
        downlink: Compression | None = None,
    ) -> None:
        if round_deadline <= 0:
            raise ValueError(f"round_deadline must be positive, got {round_deadline}")
        self.run_id = run_id
        self.round_deadline, self.min_available, self.wait_timeout = round_deadline, min_available, wait_timeout
        self.min_clients, self.proceed_after, self.log_every = min(min_clients, min_available), proceed_after, log_every
        self.waiting: tuple[int, int] | None = None  # (connected, wanted) while `client_ids` waits
        self.fit_config, self.receipts = dict(fit_config or {}), receipts
        self._cond = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._pending: dict[bytes, Task] = {}
        self._closed: OrderedDict[bytes, str] = OrderedDict()
        self._finished: str | None = None
        self.rejections: deque[Rejection] = deque(maxlen=1000)
        self.rejected_count = 0
        self.last_stats: dict[str, RoundStats] = {}  # task kind ("fit", "evaluate", "exchange") -> latest
        self.downlink = DownlinkServer(downlink) if downlink is not None else None
        self._unread = {"bytes_down": 0.0, "bytes_up": 0.0}  # since the last `transport_metrics`

    # ----- what the round loop calls
    @property
    def client_ids(self) -> Sequence[str]:
        """Connected clients in natural order, after the bounded wait described in the class docstring."""
        start = next_log = time.monotonic()
        quorum_since: float | None = None
        logged = -1  # the count of connected clients last logged: a change is logged at once
        with self._cond:
            try:
                while (connected := len(self._sessions)) < self.min_available:
                    now = time.monotonic()
                    if connected >= self.min_clients:
                        quorum_since = quorum_since or now
                        if now - quorum_since >= self.proceed_after:
                            log.warning("event=proceeding connected=%d wanted=%d waited=%.0fs: going on with the "
                                        "clients connected", connected, self.min_available, now - start)
                            break
                    else:
                        quorum_since = None
                        if now - start >= self.wait_timeout:
                            raise NotEnoughClientsError(
                                f"only {connected} clients connected within {self.wait_timeout:.0f}s; a round needs "
                                f"at least min_clients = {self.min_clients} (and waits for {self.min_available}); "
                                "start more clients or lower min_clients / wait_for_clients / clients_per_round")
                    self.waiting = (connected, self.min_available)
                    if now >= next_log or connected != logged:
                        then = (f"proceeding_in={self.proceed_after - (now - quorum_since):.0f}s" if quorum_since
                                else f"min_clients={self.min_clients}")
                        log.info("event=waiting_for_clients connected=%d wanted=%d %s", connected, self.min_available,
                                 then)
                        next_log, logged = now + self.log_every, connected
                    ends = [next_log, start + self.wait_timeout] if quorum_since is None else \
                        [next_log, quorum_since + self.proceed_after]
                    self._cond.wait(max(0.0, min(ends) - now))
            finally:
                self.waiting = None
            return self.connected()

    def connected(self) -> list[str]:
        """Ids of the clients connected right now."""
        with self._cond:
            return sorted(self._sessions, key=_natural_key)

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = (), *,
        nonces: Mapping[str, bytes] | None = None, await_clients: bool = False,
    ) -> list[Update | Failure]:
        """Train each instructed client on `state`. `nonces` names tasks in advance (a task owed from before a
        server restart is sent again under its nonce: a client that still holds its result answers at once);
        with `await_clients` a client not connected yet is waited for, within the deadline. Audit receipts go
        only to clients connected now, in fresh tasks: a bundle never delivered would leave the server
        believing the client saw a head it did not."""
        connected = set(self.connected())
        bodies = {cid: _Body(_round(c), encode_config({**self.fit_config, **c, **(
            self._audit(cid) if cid in connected and not await_clients else {})})) for cid, c in instructions.items()}
        layout = Layout.of(state)
        limit = RESULT_OVERHEAD + 8 * layout.size  # a float64 delta
        codec = update_codec(transforms, layout)  # the server's choice, never the client's
        if self.downlink is not None:
            self.downlink.advance(state)
        return list(self._dispatch(pb.FIT, state, bodies, limit, [t.name for t in transforms], codec=codec,
                                   compressed=self.downlink is not None, nonces=nonces,
                                   await_clients=await_clients).values())

    def transport_metrics(self) -> dict[str, float]:
        with self._cond:
            unread, self._unread = self._unread, {"bytes_down": 0.0, "bytes_up": 0.0}
        return unread

    def _audit(self, cid: str) -> Config:
        bundle = self.receipts.bundle(cid) if self.receipts is not None else None
        return {AUDIT_KEY: bundle} if bundle is not None else {}

    def final_audit(self, cid: str) -> bytes:
        """What the run's end (`Finished`) carries for client `cid`: its audit bundle as a config message, with
        the receipts of its last rounds, which no later task carries (empty without an audit log)."""
        try:
            audit = self._audit(cid)
        except Exception as exc:  # noqa: BLE001 - the run is over; a client left without receipts must not crash
            log.warning("event=final_receipts_failed client=%s reason=%r", cid, f"{type(exc).__name__}: {exc}")
            return b""
        return encode_config(audit) if audit else b""

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        bodies = {cid: _Body(_round(c), encode_config(c)) for cid, c in instructions.items()}
        return list(self._dispatch(pb.EVALUATE, state, bodies, RESULT_OVERHEAD, None).values())

    def exchange(
        self,
        messages: Mapping[str, Message],
        *,
        state: State | None = None,
        transforms: Sequence[Transform] = (),
        deadline: float | None = None,
    ) -> dict[str, Message | Failure]:
        """One stage of a multi-exchange protocol: each client's handler for `message.kind` answers (see
        `run_client(handlers=...)`). `state` travels along when the stage trains, and then `fit_config` and the
        client's audit receipts are merged into the stage's fit instructions (`meta["config"]`), as for a plain
        fit task."""
        if state is not None:  # a training stage: its fit instructions carry the receipts, as a fit task's do
            messages = {cid: _with_fit_config(m, {**self.fit_config, **self._audit(cid)}) for cid, m in messages.items()}
        bodies = {cid: _Body(_round(m.meta), b"", encode_message(m)) for cid, m in messages.items()}
        limit = max(MAX_REPLY_BYTES, RESULT_OVERHEAD + 16 * (Layout.of(state).size if state is not None else 0))
        return self._dispatch(pb.EXCHANGE, state, bodies, limit, [t.name for t in transforms] if state is not None
                              else None, deadline)

    def finish(self, reason: str) -> None:
        """Tell every client, now and on later connections, that the run is over."""
        with self._cond:
            self._finished = reason
            for session in self._sessions.values():
                session.put(reason)

    # ----- what the stream handlers call
    def attach(self, session: Session) -> None:
        """Register a newly authenticated connection; an older connection of the same client is closed."""
        with self._cond:
            old = self._sessions.get(session.client_id)
            self._sessions[session.client_id] = session
            if self._finished is not None:
                session.put(self._finished)
            self._cond.notify_all()
        if self.receipts is not None and session.audit_size:
            self.receipts.holds(session.client_id, session.audit_size)
        if old is not None:
            self.detach(old, "the client opened a new connection")
            old.cancel()
        log.info("event=connected client=%s peer=%s transforms=%s", session.client_id, session.peer,
                 ",".join(session.transforms) or "-")

    def detach(self, session: Session, reason: str = "connection lost before the result arrived") -> None:
        """Forget a closed connection; its unanswered tasks fail now instead of at the deadline."""
        with self._cond:
            if self._sessions.get(session.client_id) is session:
                del self._sessions[session.client_id]
                log.info("event=disconnected client=%s reason=%r", session.client_id, reason)
            for nonce, task in list(self._pending.items()):
                if task.session is session:
                    self._resolve(task, Failure(task.client_id, "drop", reason),
                                  f"late: the connection that received this task closed ({reason})")
        session.put(None)

    def deliver(self, session: Session, header: pb.ResultHeader, payload: bytes, wire_bytes: int) -> str | None:
        """Check and accept one result; return None if accepted, else the reason it was rejected."""
        cid, rnd = session.client_id, int(header.round)
        reason = self._authenticity_problem(session, header, payload)
        task = None
        if reason is None:
            with self._cond:
                task, reason = self._claim(session, header)
        if reason is not None:
            self._reject(cid, rnd, reason)
            return reason
        assert task is not None
        task.bytes_received, task.train_seconds = wire_bytes, float(header.train_seconds)
        try:
            result = self._decode(task, header, payload)
        except Exception as exc:  # noqa: BLE001 - whatever a client sent, only its own task fails
            result = Failure(cid, "rejected", f"result could not be decoded ({type(exc).__name__}: {exc})"[:500])
        with self._cond:
            if task.result is None:  # the deadline may have passed while decoding
                self._resolve(task, result, "replay: this task's result was already received")
        if isinstance(result, Failure) and result.kind == "rejected":
            self._reject(cid, rnd, result.reason)
            return result.reason
        log.info("event=result client=%s round=%d kind=%s bytes=%d train_seconds=%.3f", cid, rnd,
                 KIND_NAMES[task.kind], wire_bytes, task.train_seconds)
        return None

    # ----- internals
    def _dispatch(self, kind: int, state: State | None, bodies: dict[str, "_Body"], result_limit: int,
                  transforms: list[str] | None, deadline: float | None = None, codec: Any = None,
                  compressed: bool = False, nonces: Mapping[str, bytes] | None = None,
                  await_clients: bool = False) -> dict[str, Any]:
        """Send one task per client and wait for all results or the deadline; results keep `bodies`' order.
        `compressed`: the model travels as the downlink changes each connection has not seen."""
        start = time.monotonic()
        deadline = deadline or self.round_deadline
        payload = encode_state(state) if state is not None and not compressed else b""
        digests = {payload: hashlib.sha256(payload).digest()}
        tasks: dict[str, Task | Failure] = {}
        nonces = nonces or {}
        with self._cond:
            while await_clients and not set(bodies) <= set(self._sessions) and time.monotonic() < start + deadline:
                self._cond.wait(start + deadline - time.monotonic())
            for cid, body in bodies.items():
                session = self._sessions.get(cid)
                if session is None:
                    tasks[cid] = Failure(cid, "drop", "not connected when the task was sent")
                elif transforms is not None and session.transforms != transforms:
                    tasks[cid] = Failure(cid, "rejected", f"client applies transforms {session.transforms}, "
                                                          f"the server expects {transforms}")
                elif len(body.config) + len(body.message) > MAX_HEADER_BODY:
                    tasks[cid] = Failure(cid, "rejected", f"task config or stage message of "
                                                          f"{len(body.config) + len(body.message)} bytes exceeds the "
                                                          f"{MAX_HEADER_BODY} bytes a task header may carry")
                else:
                    sent = payload
                    if compressed:
                        assert self.downlink is not None
                        sent, session.held = self.downlink.payload(session.held), self.downlink.version
                    digest = digests.get(sent) or digests.setdefault(sent, hashlib.sha256(sent).digest())
                    task = Task(nonces.get(cid) or os.urandom(NONCE_BYTES), cid, body.round, kind, body.config, body.message, sent,
                                digest, deadline, result_limit, session, codec)
                    self._pending[task.nonce] = task
                    tasks[cid] = task
                    session.put(task)
            end = start + deadline
            waiting = [t for t in tasks.values() if isinstance(t, Task)]
            while any(t.result is None for t in waiting) and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())
            for task in waiting:
                if task.result is None:
                    self._resolve(task, Failure(task.client_id, "timeout", f"no result within the deadline of {deadline:g}s"),
                                  f"late: round {task.round}'s deadline of {deadline:g}s passed before the result arrived")
        rnd = next(iter(bodies.values())).round if bodies else 0
        self._record_stats(kind, rnd, waiting, time.monotonic() - start)
        return {cid: t.result if isinstance(t, Task) else t for cid, t in tasks.items()}

    def _authenticity_problem(self, session: Session, header: pb.ResultHeader, payload: bytes) -> str | None:
        if header.run_id != self.run_id:
            return f"cross-run: result is for run {header.run_id!r}, this server runs {self.run_id!r}"
        if header.client_id != session.client_id:
            return f"claims to be client {header.client_id!r} on the authenticated connection of {session.client_id!r}"
        if not verify(session.public_hex, header.signature, result_message(header)):
            return f"forged: signature does not verify with the registered key of client {session.client_id!r}"
        return None

    def _claim(self, session: Session, header: pb.ResultHeader) -> tuple[Task | None, str | None]:
        """Under the lock: the pending task this result answers, or why there is none."""
        nonce = bytes(header.nonce)
        task = self._pending.get(nonce)
        if task is None:
            return None, self._closed.get(nonce, "unknown nonce: this server never issued it (replayed from "
                                                 "another run, or from before a server restart)")
        if task.session is not session:
            return None, f"nonce was issued to client {task.client_id!r}, not to this connection"
        if task.round != header.round or task.kind != header.kind:
            return None, (f"result is for round {header.round} ({KIND_NAMES[header.kind]}), the task was round "
                          f"{task.round} ({KIND_NAMES[task.kind]})")
        return task, None

    def _decode(self, task: Task, header: pb.ResultHeader, payload: bytes) -> Update | EvalResult | Failure:
        cid = task.client_id
        if header.error:
            return Failure(cid, "crash", f"client reported an error: {header.error}")
        try:
            if task.kind == pb.EVALUATE:
                metrics = decode_metrics(payload)
                count = metrics.get("num_examples", 0.0)
                problem = metrics_problem(metrics) or (None if float(count).is_integer() and 0 <= count <= MAX_COUNT
                                                       else f"num_examples must be a count, got {count!r}")
                if problem is not None:
                    return Failure(cid, "rejected", f"evaluation result rejected: {problem}")
                return EvalResult(cid, int(count), metrics)
            if task.kind == pb.EXCHANGE:
                return decode_message(payload)
            update = decode_update(payload, codec=task.codec)
        except SerializationError as exc:
            return Failure(cid, "rejected", f"update rejected: {exc}")
        if update.client_id != cid or update.round != task.round:
            return Failure(cid, "rejected", f"update rejected: it names client {update.client_id!r} round "
                                            f"{update.round}, the task was for {cid!r} round {task.round}")
        problem = count_problem(update.num_examples) or metrics_problem(update.metrics)
        return Failure(cid, "rejected", f"update rejected: {problem}") if problem is not None else update

    def _resolve(self, task: Task, result: Update | EvalResult | Failure, closed_reason: str) -> None:
        """Under the lock: settle `task` and remember why its nonce accepts nothing more."""
        task.result = result
        self._pending.pop(task.nonce, None)
        self._closed[task.nonce] = closed_reason
        while len(self._closed) > MAX_CLOSED_NONCES:
            self._closed.popitem(last=False)
        self._cond.notify_all()

    def _reject(self, client_id: str, rnd: int, reason: str) -> None:
        with self._cond:
            self.rejections.append(Rejection(client_id, rnd, reason))
            self.rejected_count += 1
        log.warning("event=result_rejected client=%s round=%d reason=%r", client_id, rnd, reason)

    def _record_stats(self, kind: int, rnd: int, tasks: list[Task], seconds: float) -> None:
        stats = RoundStats(rnd, KIND_NAMES[kind], len(tasks), seconds, sum(t.bytes_sent for t in tasks),
                           sum(t.bytes_received for t in tasks), max((t.train_seconds for t in tasks), default=0.0))
        self.last_stats[stats.kind] = stats
        with self._cond:
            self._unread["bytes_down"] += stats.bytes_down
            self._unread["bytes_up"] += stats.bytes_up
        log.info("event=dispatch round=%d kind=%s clients=%d seconds=%.3f bytes_down=%d bytes_up=%d "
                 "max_train_seconds=%.3f", rnd, stats.kind, stats.clients, seconds, stats.bytes_down,
                 stats.bytes_up, stats.max_train_seconds)


def _with_fit_config(message: Message, fit_config: Config) -> Message:
    """`message` with `fit_config` under its fit instructions (the round's own instructions win)."""
    config = message.meta.get("config")
    if not fit_config or not isinstance(config, dict):
        return message
    return Message(message.kind, message.tensors, {**message.meta, "config": {**fit_config, **config}})
