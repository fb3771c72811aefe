"""A client process: connect out to the server, authenticate, then train on each task and send the signed
result, until the server says the run is over. A lost connection (server restart, network cut) is
reopened by itself with backoff; a refusal (not registered, wrong key) stops the client with the reason.

The `Client` object is the same one a simulation runs; client-side transforms run here, before anything
leaves the machine.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import random
import time
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..audit.log import AuditError
from ..audit.receipts import AUDIT_KEY, ReceiptBook, accept_bundle
from ..analytics.summary import STATISTICS_KEY, SUMMARY, answer_summary
from ..client import Client, run_fit
from ..compression import model_dtype, update_codec
from ..compression.downlink import DownlinkClient
from ..params import Layout
from ..messages import ClientSession, Handler, Message, decode_message, encode_message
from ..serialize import SerializationError, decode_state, encode_update
from ..transforms.base import Transform
from ..types import Config, State, Update
from . import fedlearn_pb2 as pb
from .channels import ClientTLS, open_channel, warn_insecure
from .identity import Identity, check_client_id, hello_message, result_message
from .wire import (CONNECT_METHOD, KIND_NAMES, MAX_TEXT, PROTOCOL, WireError, chunks, collect, decode_config,
                   encode_metrics, layout_specs)

STATISTICS_POLICIES = ("secure", "plain", "off")


def _refuse_statistics(policy: str) -> Handler:
    """The handler of the plain statistics stage for a client that does not answer it under `policy`."""
    def refuse(session: object, message: object) -> Message:
        raise PermissionError("this client answers statistics requests " + (
            "only inside secure aggregation (--statistics plain allows them in the clear)" if policy == "secure"
            else "never (--statistics off)"))

    return refuse

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 1 << 31
MIN_BACKOFF, MAX_BACKOFF = 0.25, 4.0  # seconds between reconnection attempts
_REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


class ClientRejected(RuntimeError):
    """The server refused this client; reconnecting would not help. The message carries the server's reason."""


@dataclass
class ReceivedTask:
    """A task as the client sees it: the header, the decoded global model (None for a protocol stage that
    carries none), config or stage message, and its size on the wire."""

    header: pb.TaskHeader
    state: State | None
    config: Config
    message: Message | None
    wire_bytes: int


class Connection:
    """One authenticated stream to the server. `run_client` drives it; its parts are public so that tests
    can also send what a faulty or hostile client would."""

    def __init__(self, channel: grpc.Channel, client_id: str, identity: Identity,
                 transforms: Sequence[str] = (), model: Layout | None = None,
                 held: Callable[[str], int] = lambda run_id: 0) -> None:
        self.client_id, self.identity = check_client_id(client_id), identity
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self.downlink = DownlinkClient()  # the model replica, for servers that send compressed changes
        method = channel.stream_stream(CONNECT_METHOD, request_serializer=None,
                                       response_deserializer=pb.ServerMessage.FromString)
        self._call = method(iter(self._outbox.get, None))
        self.send(pb.ClientMessage(hello=pb.Hello(protocol=PROTOCOL, client_id=client_id, transforms=transforms,
                                                  model=layout_specs(model) if model is not None else [])))
        challenge = self.expect("challenge").challenge
        self.run_id = challenge.run_id
        signature = identity.sign(hello_message(self.run_id, client_id, challenge.nonce))
        self.send(pb.ClientMessage(proof=pb.Proof(signature=signature, audit_size=held(self.run_id))))
        self.expect("welcome")
        self.finished: pb.Finished | None = None  # the message that ended the run, once it came

    def send(self, message: pb.ClientMessage | bytes) -> int:
        """Queue one message (or raw bytes) for the server; returns its size."""
        data = message if isinstance(message, bytes) else message.SerializeToString()
        self._outbox.put(data)
        return len(data)

    def expect(self, kind: str) -> pb.ServerMessage:
        message = next(self._call)
        if message.WhichOneof("body") != kind:
            raise WireError(f"expected {kind} from the server, got {message.WhichOneof('body')}")
        return message

    def next_task(self) -> ReceivedTask | str:
        """The next task, or the server's reason (str) when the run is finished."""
        message = next(self._call)
        if message.WhichOneof("body") == "finished":
            self.finished = message.finished
            return message.finished.reason
        if message.WhichOneof("body") != "task":
            raise WireError(f"expected a task from the server, got {message.WhichOneof('body')}")
        header = message.task
        payload = collect(self._call, header.payload_bytes, header.payload_sha256, MAX_MODEL_BYTES)
        exchange = header.kind == pb.EXCHANGE
        return ReceivedTask(header, self.downlink.receive(payload) if payload else None,
                            {} if exchange else decode_config(header.config),
                            decode_message(header.message) if exchange else None, message.ByteSize() + len(payload))

    def result_header(self, task: pb.TaskHeader, payload: bytes, *, error: str = "",
                      train_seconds: float = 0.0) -> pb.ResultHeader:
        """The signed header of the result of `task`."""
        header = pb.ResultHeader(run_id=task.run_id, round=task.round, nonce=task.nonce, client_id=self.client_id,
                                 kind=task.kind, payload_bytes=len(payload),
                                 payload_sha256=hashlib.sha256(payload).digest(), train_seconds=train_seconds,
                                 error=error)
        return self.sign(header)

    def sign(self, header: pb.ResultHeader) -> pb.ResultHeader:
        """(Re)compute the header's signature over its current fields."""
        header.signature = self.identity.sign(result_message(header))
        return header

    def send_result(self, header: pb.ResultHeader, payload: bytes) -> int:
        """Send a result header and its payload chunks; returns the bytes sent."""
        sent = self.send(pb.ClientMessage(result=header))
        for chunk in chunks(payload):
            sent += self.send(pb.ClientMessage(chunk=chunk))
        return sent

    def read_ack(self) -> pb.Ack:
        return self.expect("ack").ack

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()


def run_client(
    client: Client,
    server: str,
    *,
    identity: Identity,
    tls: ClientTLS | None,
    transforms: Sequence[Transform] = (),
    handlers: Mapping[str, Handler] | None = None,
    retry_for: float = 600.0,
    receipts: ReceiptBook | None = None,
    audit_key: str | None = None,
    statistics: str = "secure",
) -> str:
    """Serve `client` to the server at `server` (HOST:PORT) until the run is over; returns the server's reason.

    `tls=None` connects without TLS (plain text). `handlers` answer the stages of multi-exchange round
    protocols (a protocol's `client_handlers()`), as in simulation. After a lost connection the client
    reconnects with backoff, and gives up with `ConnectionError` after `retry_for` seconds without one.
    A refusal raises `ClientRejected`.

    With `receipts`, the audit receipts the server sends with each fit task (or training stage) and with the
    end of the run are checked (signed by `audit_key`, else the key first seen for the run) and kept there; a
    bad bundle fails that task with the reason, so the server learns it and the client does not train for a
    server whose log does not add up; a bad bundle at the end of the run raises `AuditError`.

    `statistics` says which federated-statistics requests the client answers from `client.local_features()`:
    "secure" only inside secure aggregation (the server learns only the cohort's sum), "plain" also in the clear
    (the server sees this client's summary), "off" none; a refused request fails with the reason.
    """
    if statistics not in STATISTICS_POLICIES:
        raise ValueError(f"statistics must be one of {STATISTICS_POLICIES}, got {statistics!r}")
    summary = answer_summary if statistics == "plain" else _refuse_statistics(statistics)
    worker = _Worker(client, transforms, {SUMMARY: summary, **dict(handlers or {})}, receipts=receipts,
                     audit_key=audit_key, statistics=statistics)
    layout = client.model_layout()  # the server refuses a different model at once, naming the parameter
    if tls is None:
        warn_insecure()
    lost_since: float | None = None
    backoff = MIN_BACKOFF
    while True:
        channel = open_channel(server, tls)
        connection = None
        try:
            connection = Connection(channel, client.cid, identity, [t.name for t in transforms], layout,
                                    worker.held_size)
            log.info("event=registered client=%s server=%s run=%s", client.cid, server, connection.run_id)
            worker.join(connection.run_id)
            lost_since, backoff = None, MIN_BACKOFF
            reason = _serve(connection, worker)
            log.info("event=finished client=%s reason=%r", client.cid, reason)
            return reason
        except grpc.RpcError as exc:
            if exc.code() in _REFUSALS:
                raise ClientRejected(f"the server refused client {client.cid!r}: {exc.details()}") from None
            reason = f"{exc.code().name}: {exc.details()}{tls_hint(exc, tls)}"
        except (WireError, SerializationError) as exc:
            reason = f"bad message from the server: {exc}"
        finally:
            if connection is not None:
                connection.close()
            channel.close()
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > retry_for:
            raise ConnectionError(f"no connection to {server} for {retry_for:.0f}s (last error: {reason})")
        wait = backoff * random.uniform(0.5, 1.0)  # jitter: clients cut at once do not return at once
        log.warning("event=connection_lost client=%s reason=%r retry_in=%.2f", client.cid, reason, wait)
        time.sleep(wait)
        backoff = min(2 * backoff, MAX_BACKOFF)


def tls_hint(exc: grpc.RpcError, tls: ClientTLS | None) -> str:
    """A likely cause of a failed connection that gRPC reports only as a closed socket or a failed handshake:
    TLS on one side and not on the other."""
    details = (exc.details() or "").lower()
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    if tls is None and any(s in details for s in ("socket closed", "connection reset", "end of stream", "eof")):
        return (" (this client connects without TLS (--insecure); a server that uses TLS closes such connections: "
                "drop --insecure and give --credentials with the server's CA)")
    if tls is not None and any(s in details for s in ("ssl", "handshake", "tls")):
        return (" (the TLS handshake failed: the server may run without TLS (--insecure), or its certificate is not "
                "signed by the CA in this client's credentials)")
    return ""


@dataclass
class _Worker:
    """Runs one task of any kind with the client's code; `memory` outlives the stages of a protocol (and
    reconnections) within one run, and starts empty for another run."""

    client: Client
    transforms: Sequence[Transform]
    handlers: dict[str, Handler]
    memory: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    receipts: ReceiptBook | None = None
    audit_key: str | None = None
    statistics: str = "secure"  # which statistics requests it answers (see `run_client`)
    # the last result not yet acknowledged: (nonce, payload, seconds, error); a restarted server sends its
    # task again under the same nonce, and gets this answer without the work being done twice
    held: tuple[bytes, bytes, float, str] | None = None

    def join(self, run_id: str) -> None:
        """Note the run of a new connection; a different run gets fresh protocol memory (and no held result)."""
        if run_id != self.run_id:
            self.run_id, self.memory, self.held = run_id, {}, None

    def run(self, task: ReceivedTask) -> tuple[bytes, float]:
        """The encoded result and the seconds of local work (encoding excluded)."""
        start = time.perf_counter()
        if task.header.kind == pb.FIT:
            if STATISTICS_KEY in task.config and self.statistics != "plain":
                _refuse_statistics(self.statistics)(None, None)
            codec = update_codec(self.transforms, Layout.of(task.state))  # the model's dtype, or compressed
            self.keep_receipts(task.config, f"round {task.header.round}")
            result = run_fit(self.client, task.state, task.config, self.transforms)
            encode = partial(encode_update, codec=codec, extras_dtype=model_dtype(Layout.of(task.state)))
        elif task.header.kind == pb.EVALUATE:
            result, encode = self.client.evaluate(task.state, task.config), encode_metrics
        else:
            handler = self.handlers.get(task.message.kind)
            if handler is None:
                raise LookupError(f"client has no handler for stage {task.message.kind!r}")
            session = ClientSession(self.client.cid, self.memory, lambda config: self._fit(task.state, config))
            result, encode = handler(session, task.message), encode_message
        seconds = time.perf_counter() - start
        return encode(result), seconds

    def _fit(self, state: State | None, config: Config) -> Update:
        if state is None and STATISTICS_KEY not in config:  # a statistics task needs no model
            raise RuntimeError("this protocol stage carried no model to train")
        if STATISTICS_KEY in config and self.statistics == "off":
            _refuse_statistics("off")(None, None)
        self.keep_receipts(config, f"round {config.get('round', '?')}")
        return run_fit(self.client, state, config, self.transforms)

    def keep_receipts(self, config: Config, when: str) -> None:
        """Take the audit bundle out of a fit config and, keeping receipts, check and keep it; raises
        `AuditError` (failing the task) when it does not check out."""
        bundle = config.pop(AUDIT_KEY, None)
        if bundle is not None and self.receipts is not None:
            kept = accept_bundle(self.receipts, bundle, self.client.cid, self.audit_key)
            log.info("event=audit_receipts client=%s at=%r kept=%d head_size=%d", self.client.cid, when, len(kept),
                     bundle["head"]["size"])

    def held_size(self, run_id: str) -> int:
        """The size of the newest head of run `run_id`'s audit log kept in the receipts (0: none)."""
        try:
            head = self.receipts.latest_head(run_id) if self.receipts is not None else None
        except (AuditError, OSError, ValueError) as exc:
            log.warning("event=receipts_unreadable client=%s reason=%r", self.client.cid, str(exc))
            return 0
        return head.size if head is not None else 0

    def final_receipts(self, finished: pb.Finished | None) -> None:
        """Check and keep the receipts that came with the end of the run (those of the last rounds). A bundle
        that does not check out raises `AuditError`: the run ended, but its log does not add up."""
        if finished is None or not finished.audit:
            return
        try:
            config = decode_config(finished.audit)
        except SerializationError as exc:
            raise AuditError(f"the audit bundle that ended the run is malformed: {exc}") from None
        self.keep_receipts(config, "end of run")


def _serve(connection: Connection, worker: _Worker) -> str:
    cid = worker.client.cid
    while True:
        task = connection.next_task()
        if isinstance(task, str):
            worker.final_receipts(connection.finished)
            return task
        kind, error, payload, seconds = KIND_NAMES.get(task.header.kind, "?"), "", b"", 0.0
        nonce = bytes(task.header.nonce)
        if worker.held is not None and worker.held[0] == nonce:
            _, payload, seconds, error = worker.held
            log.info("event=result_resent client=%s round=%d kind=%s: the server asked again for a result it "
                     "never acknowledged", cid, task.header.round, kind)
        else:
            try:
                payload, seconds = worker.run(task)
            except Exception as exc:  # the server learns why, and the round goes on without this client
                error = f"{type(exc).__name__}: {exc}"[:MAX_TEXT]
                log.warning("event=task_failed client=%s round=%d kind=%s error=%r", cid, task.header.round, kind,
                            error)
            worker.held = (nonce, payload, seconds, error)
        sent = connection.send_result(
            connection.result_header(task.header, payload, error=error, train_seconds=seconds), payload)
        ack = connection.read_ack()
        worker.held = None
        log.info("event=result client=%s round=%d kind=%s bytes_in=%d bytes_out=%d train_seconds=%.3f "
                 "accepted=%s%s", cid, task.header.round, kind, task.wire_bytes, sent, seconds,
                 ack.accepted, "" if ack.accepted else f" reason={ack.reason!r}")
