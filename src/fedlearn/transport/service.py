"""The server's side of the wire: one handler per client stream, and the status call.

A stream first authenticates the client (Hello with its id, the server's random Challenge, and the
client's Ed25519 Proof over it, checked against the allow-list), then serves tasks one at a time: the
task header and its model chunks go out, and results are read until this task's result has been handled
(replays and forgeries in between are answered with a rejecting Ack). Requests arrive as raw bytes and pass
`wire.decode_client_message`, so malformed input ends only its own stream, with the reason.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator

import grpc

from ..params import Layout, layout_difference
from . import fedlearn_pb2 as pb
from .identity import AllowList, IdentityError, hello_message, verify
from .remote_pool import RemotePool, Session, Task
from .wire import SERVICE, WireError, chunks, collect, decode_client_message, layout_of_hello

log = logging.getLogger(__name__)


class Refused(Exception):
    """A connection that failed authentication; the message is sent to the client."""


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
    """gRPC handlers for `RemotePool`; `status` builds the reply of the Status call."""

    def __init__(self, pool: RemotePool, allow_list: str | os.PathLike, status: Callable[[], pb.StatusReply], *,
                 handshake_timeout: float = 10.0, model_layout: Layout | None = None) -> None:
        self.pool, self.allow_list, self.status_reply = pool, allow_list, status
        self.handshake_timeout, self.model_layout = handshake_timeout, model_layout

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.connect, request_deserializer=None, response_serializer=pb.ServerMessage.SerializeToString),
            "Status": grpc.unary_unary_rpc_method_handler(
                self.status, request_deserializer=None, response_serializer=pb.StatusReply.SerializeToString),
        })

    def status(self, request: bytes, context: grpc.ServicerContext) -> pb.StatusReply:
        return self.status_reply()

    def connect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        peer, messages, session = context.peer(), _Counted(requests), None
        timer = threading.Timer(self.handshake_timeout, context.cancel)  # unauthenticated streams cannot linger
        timer.daemon = True
        timer.start()
        try:
            session = yield from self._handshake(messages, context, peer)
            timer.cancel()
            context.add_callback(lambda: self.pool.detach(session, "connection closed"))
            self.pool.attach(session)
            yield pb.ServerMessage(welcome=pb.Welcome(run_id=self.pool.run_id))
            yield from self._serve(session, messages)
        except WireError as exc:
            log.warning("event=protocol_error peer=%s client=%s reason=%r", peer, _cid(session), str(exc))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"protocol error: {exc}")
        except Refused as exc:
            log.warning("event=refused peer=%s reason=%r", peer, str(exc))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ModelMismatch as exc:
            log.warning("event=model_mismatch peer=%s reason=%r", peer, str(exc))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (grpc.RpcError, StopIteration):
            pass  # the client went away; detach below fails its open tasks
        finally:
            timer.cancel()
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
        if cid not in keys:
            raise Refused(f"client {cid!r} is not registered on the server's allow-list")
        challenge = os.urandom(32)
        yield pb.ServerMessage(challenge=pb.Challenge(nonce=challenge, run_id=self.pool.run_id))
        proof = _expect(messages, "proof").proof
        if not verify(keys[cid], proof.signature, hello_message(self.pool.run_id, cid, challenge)):
            raise Refused(f"client {cid!r} failed authentication: its signature does not match its registered key")
        client_layout = layout_of_hello(hello)
        if self.model_layout is not None and client_layout is not None:
            problem = layout_difference(self.model_layout, client_layout, there=f"client {cid!r}'s model")
            if problem is not None:
                raise ModelMismatch(f"model mismatch: {problem}; client and server must build the same model")
        return Session(cid, keys[cid], list(hello.transforms), peer, context.cancel)

    def _serve(self, session: Session, messages: _Counted) -> Iterator[pb.ServerMessage]:
        while True:
            item = session.next()
            if item is None:
                return
            if isinstance(item, str):
                yield pb.ServerMessage(finished=pb.Finished(reason=item))
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
    message = next(messages)
    if message.WhichOneof("body") != kind:
        raise WireError(f"expected {kind}, got {message.WhichOneof('body')}")
    return message


def _cid(session: Session | None) -> str:
    return session.client_id if session is not None else "-"
