"""`WirePool`: a simulation whose messages go through the real wire format, so it measures the bytes a
deployment would send and its server sees exactly what a deployment's server decodes.

Every update is packed by the run's codec (`update_codec`: the model's dtype, or the compression transform's)
and unpacked by the strict decoder; every client's download is the encoded global model. With `downlink`
(a compression transform), clients hold a replica of the model and download only the compressed changes
they missed, as a deployment's clients do (`fedlearn.compression.downlink`): a client sampled for the first
time, or after more than `keep` changes, downloads the whole replica. Only training messages are counted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..compression import Compression, model_dtype, update_codec
from ..compression.downlink import DownlinkServer
from ..params import Layout
from ..serialize import SerializationError, decode_update, encode_state, encode_update
from ..server.pool import ClientPool
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update


@dataclasses.dataclass
class WireStats:
    """Bytes of the latest `fit` call: downloads of the model, uploads of the updates (all clients)."""

    bytes_down: int = 0
    bytes_up: int = 0
    updates: int = 0


class WirePool(ClientPool):
    """Wraps a pool; see the module docstring."""

    def __init__(self, pool: ClientPool, downlink: Compression | None = None, keep: int = 16) -> None:
        self.pool = pool
        self.downlink = DownlinkServer(downlink, keep) if downlink is not None else None
        self.held: dict[str, int] = {}  # client -> the replica version it holds
        self.last = WireStats()
        self._unread = WireStats()  # since the last `transport_metrics`

    @property
    def client_ids(self) -> Sequence[str]:
        return self.pool.client_ids

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        layout = Layout.of(state)
        sent_state, stats = self._download(state, instructions)
        results = self.pool.fit(sent_state, instructions, transforms)
        codec = update_codec(transforms, layout)
        out: list[Update | Failure] = []
        for result in results:
            if isinstance(result, Update):
                data = encode_update(result, codec, extras_dtype=model_dtype(layout))
                stats.bytes_up += len(data)
                stats.updates += 1
                try:
                    result = decode_update(data, codec=codec)
                except SerializationError as exc:
                    result = Failure(result.client_id, "rejected", f"update rejected: {exc}")
            out.append(result)
        self.last = stats
        self._unread.bytes_down += stats.bytes_down
        self._unread.bytes_up += stats.bytes_up
        return out

    def transport_metrics(self) -> dict[str, float]:
        unread, self._unread = self._unread, WireStats()
        return {"bytes_down": float(unread.bytes_down), "bytes_up": float(unread.bytes_up)}

    def _download(self, state: State, instructions: Mapping[str, Config]) -> tuple[State, WireStats]:
        """The model clients train from and the bytes they download for it."""
        if self.downlink is None:
            return state, WireStats(bytes_down=len(encode_state(state)) * len(instructions))
        sent = self.downlink.advance(state)
        stats = WireStats()
        for cid in instructions:
            stats.bytes_down += len(self.downlink.payload(self.held.get(cid)))
            self.held[cid] = self.downlink.version
        return sent, stats

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        return self.pool.evaluate(state, instructions)

    def close(self) -> None:
        self.pool.close()
