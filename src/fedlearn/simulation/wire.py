"""`WirePool`: a simulation whose messages go through the real wire format, so it measures the bytes a
deployment would send and its server sees exactly what a deployment's server decodes.

Every update is packed by the run's codec (`update_codec`: the model's dtype, or the compression transform's)
and unpacked by the strict decoder; every client's download is the encoded global model. With `downlink`
(a compression transform), clients hold a replica of the model and download only the compressed difference
between the server's model and that replica, which both sides then add to it (the difference is always
taken against the replica, so compression errors do not accumulate). The replica is shared by all clients:
a client that missed versions would fetch the full model, which this measurement leaves out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ..compression import Compression, update_codec
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

    def __init__(self, pool: ClientPool, downlink: Compression | None = None) -> None:
        self.pool, self.downlink = pool, downlink
        self.replica: np.ndarray | None = None
        self._broadcasts = 0  # seeds the downlink compressor's randomness, one draw per broadcast
        self.last = WireStats()

    @property
    def client_ids(self) -> Sequence[str]:
        return self.pool.client_ids

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        layout = Layout.of(state)
        sent_state, download = self._download(state, layout)
        results = self.pool.fit(sent_state, instructions, transforms)
        codec = update_codec(transforms, layout)
        stats = WireStats(bytes_down=download * len(instructions))
        out: list[Update | Failure] = []
        for result in results:
            if isinstance(result, Update):
                data = encode_update(result, codec)
                stats.bytes_up += len(data)
                stats.updates += 1
                try:
                    result = decode_update(data, codec=codec)
                except SerializationError as exc:
                    result = Failure(result.client_id, "rejected", f"update rejected: {exc}")
            out.append(result)
        self.last = stats
        return out

    def _download(self, state: State, layout: Layout) -> tuple[State, int]:
        """The model clients train from and the bytes each one downloads for it."""
        if self.downlink is None:
            return state, len(encode_state(state))
        target = layout.flatten(state)
        if self.replica is None:  # the first download is the full model
            self.replica = target
            return state, len(encode_state(state))
        self._broadcasts += 1
        change = self.downlink.client(Update("server", 0, target - self.replica, 1), {"seed": self._broadcasts})
        size = len(encode_update(change, self.downlink.wire_codec(layout.size)))
        self.replica = layout.flatten(layout.unflatten(self.replica + change.delta))  # what clients hold
        return layout.unflatten(self.replica), size

    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        return self.pool.evaluate(state, instructions)

    def close(self) -> None:
        self.pool.close()
