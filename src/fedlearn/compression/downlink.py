"""Downlink compression: the server sends clients the compressed change of the global model instead of the
model, over gRPC (`RemotePool`) and in the measured simulation (`WirePool`).

Both sides hold the same *replica*: the model as clients reconstruct it. Each time the server's model moves,
the server compresses ``model - replica`` (never the change between two server models), packs it, and adds
exactly what it packed to its copy of the replica, rounded to the model's dtypes; a client adds the decoded
change to its copy with the same arithmetic. The codecs carry their output bit for bit, so the two copies
stay identical and what compression left out one time is part of the next change (the replica never drifts
from the server's model by more than one change's compression error). Clients train from the replica.

Each change is a version. The server keeps the last `keep` changes; a client that holds an older version gets
the changes it missed, or the whole replica (with its version) when that is smaller or the changes are gone.
The server tracks the version each connection holds; a client that cannot apply a change (it does not hold
the version the change starts from, or the message is malformed) drops the connection and gets the whole
replica on the next one, so a lost message can never leave a client on a different model silently.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..params import Layout
from ..serialize import DEFAULT_MAX_BYTES, SerializationError, decode_tensors, encode_tensors, update_key
from ..types import State, Update
from .settings import compression_from_spec, spec_of
from .transforms import Compression, TopK

SERVER_ID = "server"  # the client id the server's changes are keyed by (randomness, masks)
CHANGE_KIND = "model_change"
MAX_CHANGES = 64  # most changes one message may carry


class DownlinkServer:
    """The server's half: the replica, its version and the recent changes (see the module docstring)."""

    def __init__(self, compression: Compression, keep: int = 16) -> None:
        if isinstance(compression, TopK) and compression.error_feedback:
            raise ValueError("downlink top-k needs error_feedback=False: the downlink already feeds its error back")
        if not 1 <= keep <= MAX_CHANGES:
            raise ValueError(f"keep must be in [1, {MAX_CHANGES}], got {keep}")
        self.compression, self.keep, self.spec = compression, keep, spec_of(compression)
        self.layout: Layout | None = None
        self.replica: np.ndarray | None = None
        self.target: np.ndarray | None = None
        self.version = 0
        self.changes: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()  # version -> packed change
        self._payloads: dict[int | None, bytes] = {}

    def advance(self, state: State) -> State:
        """Move to the server's model `state` (a no-op if it has not changed) and return the replica clients
        will train from."""
        layout = Layout.of(state)
        target = layout.flatten(state)
        if self.replica is None or self.layout is None or self.layout.size != layout.size:
            self.layout, self.replica, self.target, self.version = layout, target, target, 0
            self.changes.clear()
            self._payloads = {}
        elif not np.array_equal(target, self.target):
            self.version += 1
            change = self.compression.client(Update(SERVER_ID, self.version, target - self.replica, 1),
                                             {"seed": self.version}).delta
            codec = self.compression.wire_codec(layout.size)
            self.changes[self.version] = codec.encode(change, update_key(SERVER_ID, self.version))
            while len(self.changes) > self.keep:
                self.changes.popitem(last=False)
            self.replica = layout.flatten(layout.unflatten(self.replica + change))
            self.target = target
            self._payloads = {}
        return self.layout.unflatten(self.replica)

    def payload(self, held: int | None) -> bytes:
        """What a client holding version `held` (None: nothing) downloads: the changes it missed, or the whole
        replica when that is smaller or they are no longer kept."""
        assert self.layout is not None and self.replica is not None, "advance() first"
        key = held if held is not None and self.version - MAX_CHANGES <= held <= self.version and \
            all(v in self.changes for v in range(held + 1, self.version + 1)) else None
        if key not in self._payloads:
            if key is None:
                data = encode_tensors(self.layout.unflatten(self.replica), {"kind": "state", "version": self.version})
            else:
                tensors = {f"{v}/{name}": t for v in range(key + 1, self.version + 1) for name, t in self.changes[v].items()}
                data = encode_tensors(tensors, {"kind": CHANGE_KIND, "from": key, "to": self.version,
                                                "compression": self.spec})
                if len(data) >= len(self.payload(None)):
                    data = self.payload(None)
            self._payloads[key] = data
        return self._payloads[key]


class DownlinkClient:
    """The client's half: its replica and version; `receive` turns a task's model payload into the model."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.replica: np.ndarray | None = None
        self.version: int | None = None

    def receive(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> State:
        """The model a payload carries: a whole state (a replica when it names its version), or changes to
        apply to the replica. `SerializationError` for anything it cannot apply exactly."""
        tensors, meta = decode_tensors(data, max_bytes=max_bytes)
        if meta.get("kind") == "state":
            version = meta.get("version")
            if version is not None:
                if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                    raise SerializationError(f"model version must be an integer >= 0, got {version!r}")
                self.layout = Layout.of(tensors)
                self.replica, self.version = self.layout.flatten(tensors), version
            return tensors
        if meta.get("kind") != CHANGE_KIND:
            raise SerializationError(f"expected a model or a model change, got a message of kind {meta.get('kind')!r}")
        if self.replica is None or self.layout is None:
            raise SerializationError("received a model change before any model")
        start, end = meta.get("from"), meta.get("to")
        if start != self.version or not isinstance(end, int) or isinstance(end, bool) or \
                not start <= end <= start + MAX_CHANGES:
            raise SerializationError(f"model change goes from version {start!r} to {end!r}, this client holds "
                                     f"version {self.version} (at most {MAX_CHANGES} changes a message)")
        try:
            compression = compression_from_spec(meta.get("compression"), "the server's downlink compression")
        except ValueError as exc:
            raise SerializationError(str(exc)) from None
        if compression is None:
            raise SerializationError("model change names no compression")
        codec = compression.wire_codec(self.layout.size)
        parts = _split(tensors, range(self.version + 1, end + 1))
        replica = self.replica
        for v, part in parts.items():
            change = codec.decode(part, update_key(SERVER_ID, v))
            replica = self.layout.flatten(self.layout.unflatten(replica + change))
        self.replica, self.version = replica, end
        return self.layout.unflatten(replica)


def _split(tensors: Mapping[str, np.ndarray], versions: range) -> dict[int, dict[str, Any]]:
    """Tensors named "<version>/<name>" grouped by version; refuses names of any other version."""
    parts: dict[int, dict[str, Any]] = {v: {} for v in versions}
    for name, tensor in tensors.items():
        version, sep, rest = name.partition("/")
        if not sep or not version.isdigit() or int(version) not in parts:
            raise SerializationError(f"model change carries unexpected tensor {name[:100]!r}")
        parts[int(version)][rest] = tensor
    return parts
