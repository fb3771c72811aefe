"""Generic messages for rounds that are protocols of several exchanges (secure aggregation: advertise keys,
share keys, masked updates, unmasking). A stage is a message `kind` plus a client-side handler registered for
that kind; pools carry messages without knowing what they mean.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .serialize import DEFAULT_MAX_BYTES, SerializationError, decode_tensors, encode_tensors
from .types import Config, Update


@dataclass
class Message:
    """One stage's payload: named arrays (keys, ciphertexts, masked vectors) and small JSON metadata."""

    kind: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientSession:
    """What a client-side handler sees: the client's id, memory kept across the stages of a protocol on
    that client, and `fit` to run the client's local training (and client-side transforms) on the model
    the exchange carried."""

    cid: str
    memory: dict[str, Any]
    fit: Callable[[Config], Update]


Handler = Callable[[ClientSession, Message], Message]


def encode_message(message: Message) -> bytes:
    """Serialize a message with the checked tensor format (never pickle)."""
    return encode_tensors(message.tensors, {"kind": "message", "type": message.kind, "meta": message.meta})


def decode_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    tensors, meta = decode_tensors(data, max_bytes=max_bytes)
    if meta.get("kind") != "message" or not isinstance(meta.get("type"), str) or not isinstance(meta.get("meta"), dict):
        raise SerializationError(f"expected a protocol message, got a message of kind {meta.get('kind')!r}")
    return Message(meta["type"], dict(tensors), meta["meta"])


def as_bytes(array: np.ndarray) -> bytes:
    """Bytes carried in a uint8 tensor."""
    return np.asarray(array, dtype=np.uint8).tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    """A uint8 tensor carrying `raw`."""
    return np.frombuffer(raw, dtype=np.uint8).copy()
