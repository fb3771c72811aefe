"""The server's side of the wire: one handler per client stream, and the status call.

A stream is admitted into the small budget of unauthenticated streams (`admission.py`), then authenticates
the client (Hello with its id, the server's random Challenge, and the client's Ed25519 Proof over it, checked
against the allow-list; with mutual TLS its certificate must name that id), then serves tasks one at a time:
the task header and its model chunks go out, and results are read until this task's result has been handled
(replays and forgeries in between are answered with a rejecting Ack). Requests arrive as raw bytes and pass
`wire.decode_client_message`, so malformed input ends only its own stream, with the reason.

Whatever fails in the handshake, the caller hears the same words: an unknown id and a wrong key are
indistinguishable (the unknown id's proof is checked against a stand-in key, so even the time is the same);
the server's log keeps the real reason.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from ..params import Layout, layout_difference
from . import fedlearn_pb2 as pb
from .admission import Admission, Busy
from .audit_rpc import AuditRefused
from .identity import AllowList, Identity, IdentityError, hello_message, verify
from .remote_pool import RemotePool, Session, Task
from .status_auth import StatusGate
from .wire import SERVICE, WireError, chunks, collect, decode_client_message, layout_of_hello

log = logging.getLogger(__name__)

AUTH_FAILED = ("authentication failed: the server does not accept this client id with this identity key "
               "(and certificate); its operator's log says why")
STATUS_REFUSED = ("status needs credentials: a registered client's folder (--credentials) or the operator "
                  "token (--token)")
AUDIT_REFUSED = ("the audit call needs credentials: a registered client's folder (--credentials) or the operator "
                 "token (--token)")
STATUS_CALLS = 4  # status calls answered at once
_STAND_IN_KEY = Identity.generate().public_hex  # checks the proofs of unknown ids, so they take as long


class Refused(Exception):
    """A connection that failed authentication; the message is for the server's log only."""


class StreamClosed(Exception):
    """The client closed its side of the stream before the server expected it to."""


class ModelMismatch(Exception):
    """An authenticated client whose model differs from the server's; the message names the parameter."""


class _Counted:
    """Decoded client messages, counting the bytes received."""

    def __init__(self, raw: Iterator[bytes]) -> None:
        self._raw, self.bytes = raw, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> pb.ClientMessage:
        data = next(self._raw)
        self.bytes += len(data)
        return decode_client_message(data)


class Service:
    """gRPC handlers for `RemotePool`; `status` builds the reply of the Status call.

    `max_clients` authenticated streams are served at once; `max_unauthenticated` streams (at most
    `max_unauthenticated_per_peer` from one address) may wait `handshake_timeout` seconds to authenticate.
    `operator_token` is the file holding the SHA-256 of the operator's status token (None: clients only).
    `audit` answers Audit calls (`audit_rpc.AuditAnswers`; None: the call is refused), with the credentials
    and within the concurrency budget of Status calls.
    """

    def __init__(self, pool: RemotePool, allow_list: str | os.PathLike, status: Callable[[], pb.StatusReply], *,
                 handshake_timeout: float = 10.0, max_clients: int = 256, max_unauthenticated: int = 64,
                 max_unauthenticated_per_peer: int = 8, operator_token: str | os.PathLike | None = None,
                 model_layout: Layout | None = None, audit: Callable[[bytes], pb.AuditReply] | None = None) -> None:
        self.pool, self.allow_list, self.status_reply, self.audit_reply = pool, allow_list, status, audit
        self.model_layout = model_layout
        self.admission = Admission(max_clients=max_clients, total=max_unauthenticated,
                                   per_peer=max_unauthenticated_per_peer, status_calls=STATUS_CALLS,
                                   handshake_timeout=handshake_timeout)
        self.status_gate = StatusGate(allow_list, Path(operator_token) if operator_token else None)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.connect, request_deserializer=None, response_serializer=pb.ServerMessage.SerializeToString),
            "Status": grpc.unary_unary_rpc_method_handler(
                self.status, request_deserializer=None, response_serializer=pb.StatusReply.SerializeToString),
            "Audit": grpc.unary_unary_rpc_method_handler(
                self.audit, request_deserializer=None, response_serializer=pb.AuditReply.SerializeToString),
        })

    def status(self, request: bytes, context: grpc.ServicerContext) -> pb.StatusReply:
        return self._gated(context, "status", STATUS_REFUSED, self.status_reply)

    def audit(self, request: bytes, context: grpc.ServicerContext) -> pb.AuditReply:
        """A consistency proof from the caller's head (see `audit_rpc`); refusals carry their reason."""
        def answer() -> pb.AuditReply:
            if self.audit_reply is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server keeps no audit log")
            try:
                return self.audit_reply(request)
            except AuditRefused as exc:
                log.info("event=audit_request_refused peer=%s reason=%r", context.peer(), str(exc))
                context.abort(exc.code, str(exc))

        return self._gated(context, "audit", AUDIT_REFUSED, answer)

    def _gated(self, context: grpc.ServicerContext, call: str, refusal: str, answer: Callable[[], Any]) -> Any:
        """`answer()` for a caller with client or operator credentials, within the budget of such calls."""
        try:
            with self.admission.status_call():
                reason = self.status_gate.refusal(context.invocation_metadata(), certificate_names(context))
                if reason is not None:
                    log.warning("event=%s_refused peer=%s reason=%r", call, context.peer(), reason)
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
                return answer()
        except Busy as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def connect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        peer, messages, session = context.peer(), _Counted(requests), None
        ticket = self.admission.enter(peer, context.cancel)
        try:
            session = yield from self._handshake(messages, context, peer)
            self.admission.authenticated(ticket)
            context.add_callback(lambda: self.pool.detach(session, "connection closed"))
            self.pool.attach(session)
            yield pb.ServerMessage(welcome=pb.Welcome(run_id=self.pool.run_id))
            yield from self._serve(session, messages)
        except WireError as exc:
            log.warning("event=protocol_error peer=%s client=%s reason=%r", peer, _cid(session), str(exc))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"protocol error: {exc}")
        except Refused as exc:
            log.warning("event=refused peer=%s reason=%r", peer, str(exc))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, AUTH_FAILED)
        except Busy as exc:
            log.info("event=busy peer=%s reason=%r", peer, str(exc))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ModelMismatch as exc:
            log.warning("event=model_mismatch peer=%s reason=%r", peer, str(exc))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StreamClosed as exc:
            log.info("event=stream_closed peer=%s client=%s reason=%r", peer, _cid(session), str(exc))
        except grpc.RpcError:
            pass  # cancelled: the client went away, or admission closed an unauthenticated stream
        finally:
            self.admission.leave(ticket)
            if session is not None:
                self.pool.detach(session, "connection closed")

    def _handshake(self, messages: _Counted, context: grpc.ServicerContext,
                   peer: str) -> Iterator[pb.ServerMessage]:
        hello = _expect(messages, "hello").hello
        cid = hello.client_id
        try:
            keys = AllowList.load(self.allow_list).keys
        except IdentityError as exc:
            log.error("event=allow_list_unreadable reason=%r", str(exc))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server cannot read its allow-list; tell its operator")
        challenge = os.urandom(32)  # sent whether or not the id is registered: the caller cannot tell
        yield pb.ServerMessage(challenge=pb.Challenge(nonce=challenge, run_id=self.pool.run_id))
        proof = _expect(messages, "proof").proof
        valid = verify(keys.get(cid, _STAND_IN_KEY), proof.signature, hello_message(self.pool.run_id, cid, challenge))
        if cid not in keys:
            raise Refused(f"client {cid!r} is not registered on the server's allow-list")
        if not valid:
            raise Refused(f"client {cid!r} failed authentication: its signature does not match its registered key")
        names = certificate_names(context)
        if names is not None and cid not in names:
            raise Refused(f"client {cid!r} authenticated with a TLS certificate that names {sorted(names)}, not it")
        client_layout = layout_of_hello(hello)
        if self.model_layout is not None and client_layout is not None:
            if set(self.model_layout.names) < set(client_layout.names):  # the server federates part of the model
                client_layout = client_layout.restricted_to(self.model_layout.names)
            problem = layout_difference(self.model_layout, client_layout, there=f"client {cid!r}'s model")
            if problem is not None:
                raise ModelMismatch(f"model mismatch: {problem}; client and server must build the same model")
        return Session(cid, keys[cid], list(hello.transforms), peer, context.cancel, int(proof.audit_size))

    def _serve(self, session: Session, messages: _Counted) -> Iterator[pb.ServerMessage]:
        while True:
            item = session.next()
            if item is None:
                return
            if isinstance(item, str):
                audit = self.pool.final_audit(session.client_id)  # the receipts of its last rounds
                yield pb.ServerMessage(finished=pb.Finished(reason=item, audit=audit))
                return
            if item.result is not None:
                continue  # its round ended while the client was busy with an earlier task
            yield from self._send_task(item)
            yield from self._receive_result(session, item, messages)

    def _send_task(self, task: Task) -> Iterator[pb.ServerMessage]:
        header = pb.ServerMessage(task=pb.TaskHeader(
            run_id=self.pool.run_id, round=task.round, nonce=task.nonce, kind=task.kind,
            config=task.config, message=task.message, payload_bytes=len(task.payload),
            payload_sha256=task.payload_sha256, deadline_seconds=task.deadline_seconds))
        task.bytes_sent = header.ByteSize()
        yield header
        for chunk in chunks(task.payload):
            message = pb.ServerMessage(chunk=chunk)
            task.bytes_sent += message.ByteSize()
            yield message

    def _receive_result(self, session: Session, task: Task, messages: _Counted) -> Iterator[pb.ServerMessage]:
        """Read results until this task's has been handled; refuse and acknowledge any other on the way."""
        while True:
            start = messages.bytes
            header = _expect(messages, "result").result
            payload = collect(messages, header.payload_bytes, header.payload_sha256, task.result_limit)
            reason = self.pool.deliver(session, header, payload, messages.bytes - start)
            yield pb.ServerMessage(ack=pb.Ack(nonce=header.nonce, accepted=reason is None, reason=reason or ""))
            if header.nonce == task.nonce and task.result is not None:
                return


def _expect(messages: _Counted, kind: str) -> pb.ClientMessage:
    try:
        message = next(messages)
    except StopIteration:  # inside a generator it would turn into a RuntimeError and a long traceback
        raise StreamClosed(f"the client closed its stream where {kind} was expected") from None
    if message.WhichOneof("body") != kind:
        raise WireError(f"expected {kind}, got {message.WhichOneof('body')}")
    return message


def certificate_names(context: grpc.ServicerContext) -> frozenset[str] | None:
    """The common names and DNS subject-alternative names of the client's TLS certificate (mutual TLS), or
    None if it showed none."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    cert = x509.load_pem_x509_certificate(pem[0])
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        names |= set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                     .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return frozenset(names)


def _cid(session: Session | None) -> str:
    return session.client_id if session is not None else "-"
