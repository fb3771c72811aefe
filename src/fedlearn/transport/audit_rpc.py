"""The Audit call: a client holding a signed tree head (from a receipt) asks the running server for the proof
that the log only grew since, and checks that proof itself.

Server side, `AuditAnswers` reads the run store read-only for each call (never the round loop's connection,
so an uncommitted round is never shown) and refuses, with the reason, a request that is too large or not a
protobuf, a head that is malformed, of another log, not signed by this server's key, or larger than the log,
and a target size that the log has no head of. Client side, `fetch_consistency` proves nothing by trusting the
server: it checks the new head's signature against the key it already holds and the Merkle consistency proof
between the two heads (`check_extends`), so a server that rewrote or truncated its log, even re-signing it with
its own key, is caught.
"""
from __future__ import annotations

import json
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from ..audit import merkle
from ..audit.log import AuditError, TreeHead, canonical
from ..audit.receipts import MAX_PROOF, check_extends
from ..audit.verify import consistency
from . import fedlearn_pb2 as pb
from .channels import ClientTLS, open_channel, warn_insecure
from .status_auth import Metadata
from .wire import AUDIT_METHOD

MAX_AUDIT_REQUEST = 4096  # a head is about 400 bytes of JSON
MAX_HEAD_JSON = 4096


class AuditRefused(Exception):
    """A request the server does not answer; `code` is the gRPC status, the message the reason the caller gets."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def parse_head(data: bytes, what: str) -> TreeHead:
    """A signed tree head from untrusted JSON bytes; `AuditError` saying what is wrong."""
    if len(data) > MAX_HEAD_JSON:
        raise AuditError(f"{what} of {len(data)} bytes exceeds {MAX_HEAD_JSON} bytes")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AuditError(f"{what} is not JSON ({type(exc).__name__})") from None
    return TreeHead.from_json(value)


class AuditAnswers:
    """The server's answers to Audit calls for the log of run `log_id` in `run_dir`, signed with `public_key`."""

    def __init__(self, run_dir: str | Path, log_id: str, public_key: str) -> None:
        self.run_dir, self.log_id, self.public_key = Path(run_dir), log_id, public_key

    def __call__(self, request: bytes) -> pb.AuditReply:
        """The reply to one raw request; raises `AuditRefused` with the reason."""
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if len(request) > MAX_AUDIT_REQUEST:
            raise AuditRefused(invalid, f"audit request of {len(request)} bytes exceeds {MAX_AUDIT_REQUEST} bytes")
        try:
            message = pb.AuditRequest.FromString(request)
            held = parse_head(message.head, "the held head")
        except DecodeError:
            raise AuditRefused(invalid, "audit request is not an AuditRequest protobuf") from None
        except AuditError as exc:
            raise AuditRefused(invalid, f"malformed head: {exc}") from None
        if held.log_id != self.log_id:
            raise AuditRefused(invalid, f"the head is for log {held.log_id[:64]!r}, this server keeps {self.log_id!r}")
        try:
            held.check(self.public_key)
        except AuditError as exc:
            raise AuditRefused(invalid, f"the head was not signed by this server's audit key: {exc}") from None
        if message.to_size and message.to_size < held.size:
            raise AuditRefused(grpc.StatusCode.OUT_OF_RANGE, f"to_size {message.to_size} is smaller than the held "
                                                             f"head's {held.size} records")
        try:
            head, proof = consistency(self.run_dir, held.size, int(message.to_size))
        except AuditError as exc:
            raise AuditRefused(grpc.StatusCode.OUT_OF_RANGE, str(exc)) from None
        return pb.AuditReply(head=canonical(head.to_json()), proof=proof)


def request_consistency(server: str, tls: ClientTLS | None, credentials: Metadata, held: TreeHead, *,
                        to_size: int = 0, timeout: float = 10.0) -> tuple[TreeHead, list[bytes]]:
    """One Audit call: the server's newer head and its consistency proof from `held`, parsed but not yet
    checked (`fetch_consistency` checks them). A refusal raises `AuditError` with the server's reason."""
    if tls is None:
        warn_insecure()
    with open_channel(server, tls) as channel:
        call = channel.unary_unary(AUDIT_METHOD, request_serializer=pb.AuditRequest.SerializeToString,
                                   response_deserializer=None)
        try:
            raw = call(pb.AuditRequest(head=canonical(held.to_json()), to_size=to_size), timeout=timeout,
                       metadata=credentials)
        except grpc.RpcError as exc:
            raise AuditError(f"{server} gave no consistency proof: {exc.code().name}: {exc.details()}") from None
    try:
        reply = pb.AuditReply.FromString(raw)
    except DecodeError:
        raise AuditError(f"{server} answered with something that is not an AuditReply") from None
    if len(reply.proof) > MAX_PROOF or any(len(p) != merkle.HASH_SIZE for p in reply.proof):
        raise AuditError(f"{server}'s consistency proof is not a list of at most {MAX_PROOF} 32-byte hashes")
    return parse_head(reply.head, f"{server}'s head"), list(reply.proof)


def fetch_consistency(server: str, tls: ClientTLS | None, credentials: Metadata, held: TreeHead, *,
                      to_size: int = 0, public_key: str | None = None, timeout: float = 10.0) -> TreeHead:
    """Ask `server` to prove its log extends `held` and check the answer; returns the newer head.

    The new head must be signed by `public_key` (default: the key that signed `held`), be of `to_size`
    records when one is asked for, and extend `held` by its consistency proof. Raises `AuditError` when the
    server refuses or its answer does not check out: a log rewritten or truncated after `held` was signed."""
    head, proof = request_consistency(server, tls, credentials, held, to_size=to_size, timeout=timeout)
    if to_size and head.size != to_size:
        raise AuditError(f"asked for the head of {to_size} records, the server sent one of {head.size}")
    check_extends(held, head, proof, public_key or held.public_key)
    return head
