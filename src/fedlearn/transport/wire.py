"""The protobuf layer: decoding and checking every message a client sends, cutting payloads into chunks and
putting them back together with a size limit and a checksum, and the payload codecs for configs and metrics.

Tensors inside payloads are `fedlearn.serialize` messages, which validate dtype, shape, size and checksum
themselves; this module only frames them. Everything a client sends passes `decode_client_message` first,
so malformed bytes become a `WireError` with a reason, never a crash.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError

from ..params import Layout
from ..serialize import SerializationError, decode_tensors, encode_tensors
from . import fedlearn_pb2 as pb
from .identity import CLIENT_ID_PATTERN

PROTOCOL = 1
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 4 << 20  # one gRPC message: a chunk or a header, with room to spare
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
MAX_TEXT = 4096
MAX_TRANSFORMS = 64
MAX_PARAMETERS = 1 << 16  # entries of a hello's model description
SERVICE = pb.DESCRIPTOR.services_by_name["FedLearn"].full_name
CONNECT_METHOD = f"/{SERVICE}/Connect"
STATUS_METHOD = f"/{SERVICE}/Status"
AUDIT_METHOD = f"/{SERVICE}/Audit"
KIND_NAMES = {pb.FIT: "fit", pb.EVALUATE: "evaluate", pb.EXCHANGE: "exchange"}


class WireError(ValueError):
    """A message that breaks the protocol: malformed, out of order, oversized or failing its checksum."""


def decode_client_message(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> pb.ClientMessage:
    """Parse and check one client message; raise `WireError` with the reason if it is unusable."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        message = pb.ClientMessage.FromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed protobuf: {exc}") from None
    kind = message.WhichOneof("body")
    if kind is None:
        raise WireError("empty message: none of hello, proof, result or chunk is set")
    _CHECKS[kind](getattr(message, kind))
    return message


def _check_hello(hello: pb.Hello) -> None:
    if hello.protocol != PROTOCOL:
        raise WireError(f"protocol version {hello.protocol} is not supported (this server speaks {PROTOCOL}); "
                        "install the same fedlearn version on client and server")
    _check_client_id(hello.client_id)
    if len(hello.transforms) > MAX_TRANSFORMS or any(len(t) > 128 for t in hello.transforms):
        raise WireError("hello lists too many or too long transform names")
    if len(hello.model) > MAX_PARAMETERS:
        raise WireError(f"hello describes more than {MAX_PARAMETERS} model parameters")
    for spec in hello.model:
        if len(spec.name) > 1024 or len(spec.shape) > 32 or len(spec.dtype) > 16:
            raise WireError("hello describes a model parameter with too long a name, shape or dtype")
        try:
            np.dtype(spec.dtype)
        except TypeError:
            raise WireError(f"hello names an unknown dtype {spec.dtype[:16]!r}") from None


def layout_of_hello(hello: pb.Hello) -> Layout | None:
    """The model layout a (checked) hello describes; None when the client sent none."""
    if not hello.model:
        return None
    return Layout(tuple(p.name for p in hello.model), tuple(tuple(int(d) for d in p.shape) for p in hello.model),
                  tuple(np.dtype(p.dtype).str for p in hello.model))


def layout_specs(layout: Layout) -> list[pb.ParameterSpec]:
    """A model layout as the hello's parameter list."""
    return [pb.ParameterSpec(name=n, shape=s, dtype=d) for n, s, d in zip(layout.names, layout.shapes, layout.dtypes)]


def _check_proof(proof: pb.Proof) -> None:
    _check_length("proof signature", proof.signature, SIGNATURE_BYTES)


def _check_result(result: pb.ResultHeader) -> None:
    if len(result.run_id) > 128:
        raise WireError("result run id is longer than 128 characters")
    _check_client_id(result.client_id)
    _check_length("result nonce", result.nonce, NONCE_BYTES)
    _check_length("result signature", result.signature, SIGNATURE_BYTES)
    _check_length("result payload checksum", result.payload_sha256, DIGEST_BYTES)
    if result.kind not in KIND_NAMES:
        raise WireError(f"result kind {result.kind} is not fit, evaluate or exchange")
    if not math.isfinite(result.train_seconds) or result.train_seconds < 0:
        raise WireError(f"result train_seconds {result.train_seconds} is not a finite non-negative number")
    if len(result.error) > MAX_TEXT:
        raise WireError(f"result error text is longer than {MAX_TEXT} characters")
    if result.error and result.payload_bytes:
        raise WireError("a result reporting an error must not carry a payload")


def _check_chunk(chunk: pb.Chunk) -> None:
    if len(chunk.data) > CHUNK_BYTES:
        raise WireError(f"chunk of {len(chunk.data)} bytes exceeds the chunk size of {CHUNK_BYTES} bytes")


_CHECKS = {"hello": _check_hello, "proof": _check_proof, "result": _check_result, "chunk": _check_chunk}


def _check_client_id(client_id: str) -> None:
    if not CLIENT_ID_PATTERN.match(client_id):
        raise WireError(f"client id {client_id[:140]!r} is not a valid client id")


def _check_length(what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise WireError(f"{what} must be {size} bytes, got {len(value)}")


def chunks(payload: bytes, size: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """Cut `payload` into numbered chunks of at most `size` bytes (none for an empty payload)."""
    view = memoryview(payload)
    for index, start in enumerate(range(0, len(view), size)):
        yield pb.Chunk(index=index, data=bytes(view[start : start + size]))


class _HasChunk(Protocol):
    chunk: pb.Chunk

    def WhichOneof(self, name: str) -> str | None: ...


def collect(messages: Iterator[_HasChunk], declared: int, sha256: bytes, limit: int) -> bytes:
    """Read the chunks of one payload of `declared` bytes from `messages`, in order, and check its SHA-256.

    Refuses a declared size over `limit` before reading anything, so an oversized payload costs nothing.
    """
    if declared > limit:
        raise WireError(f"payload of {declared} bytes exceeds the limit of {limit} bytes")
    buffer, digest, index = bytearray(), hashlib.sha256(), 0
    while len(buffer) < declared:
        try:
            message = next(messages)
        except StopIteration:
            raise WireError(f"stream ended after {len(buffer)} of {declared} payload bytes") from None
        if message.WhichOneof("body") != "chunk":
            raise WireError(f"expected payload chunk {index}, got {message.WhichOneof('body')}")
        if message.chunk.index != index or not message.chunk.data:
            raise WireError(f"chunk {message.chunk.index} is out of order or empty (expected chunk {index})")
        index += 1
        if len(buffer) + len(message.chunk.data) > declared:
            raise WireError(f"payload chunks carry more than the declared {declared} bytes")
        buffer += message.chunk.data
        digest.update(message.chunk.data)
    if digest.digest() != sha256:
        raise WireError("payload checksum mismatch: the transfer was corrupted")
    return bytes(buffer)


def encode_config(config: Mapping[str, Any]) -> bytes:
    """A task's config: array values as tensors, everything else (JSON) in the metadata."""
    arrays = {k: v for k, v in config.items() if isinstance(v, np.ndarray)}
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in config.items() if k not in arrays}
    try:
        return encode_tensors(arrays, {"kind": "config", "config": plain})
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"task config cannot be sent: {exc}") from None


def decode_config(data: bytes) -> dict[str, Any]:
    tensors, meta = decode_tensors(data, max_bytes=MAX_MESSAGE_BYTES)
    if meta.get("kind") != "config" or not isinstance(meta.get("config"), dict):
        raise SerializationError("task config message is not a config")
    return {**meta["config"], **tensors}


def encode_metrics(metrics: Mapping[str, float]) -> bytes:
    """An evaluation result: metric name -> number."""
    return encode_tensors({}, {"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}})


def decode_metrics(data: bytes) -> dict[str, float]:
    tensors, meta = decode_tensors(data, max_bytes=MAX_MESSAGE_BYTES)
    metrics = meta.get("metrics")
    if tensors or meta.get("kind") != "metrics" or not isinstance(metrics, dict):
        raise SerializationError("evaluation result is not a metrics message")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise SerializationError("evaluation metrics must map names to numbers")
    return {str(k): float(v) for k, v in metrics.items()}
