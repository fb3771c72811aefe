"""`ClientPool`: the one interface the round loop talks to, whatever the clients are (in-process,
multi-process, Ray, remote over gRPC)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence

from ..messages import Message
from ..transforms.base import Transform
from ..types import Config, EvalResult, Failure, State, Update


class ClientPool(ABC):
    """Dispatches work to clients and collects results, turning every client fault into a `Failure`.

    A pool never raises because one client misbehaved: crashes, drops and timeouts come back as `Failure`
    entries with the reason, so the round can go on with what arrived.
    """

    @property
    @abstractmethod
    def client_ids(self) -> Sequence[str]:
        """Ids of the clients available for sampling."""

    @abstractmethod
    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        """Run `fit` on each client in `instructions` (client id -> config) from the global `state`."""

    def fit_iter(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> Iterator[Update | Failure]:
        """`fit`, one result at a time as each is ready, so a streaming round can fold each update into a running
        aggregate and drop it. By default everything `fit` returns at once; pools that train clients one after
        another yield each as it finishes."""
        yield from self.fit(state, instructions, transforms)

    @abstractmethod
    def evaluate(self, state: State, instructions: Mapping[str, Config]) -> list[EvalResult | Failure]:
        """Run `evaluate` on each client in `instructions`."""

    def exchange(
        self,
        messages: Mapping[str, Message],
        *,
        state: State | None = None,
        transforms: Sequence[Transform] = (),
        deadline: float | None = None,
    ) -> dict[str, Message | Failure]:
        """Deliver one protocol stage: each client's handler for `message.kind` answers its message.

        `state` (and `transforms`) travel along when a stage trains (the handler calls `session.fit`);
        a client that has not answered within `deadline` seconds is a `Failure` of kind "timeout".
        """
        raise NotImplementedError(f"{type(self).__name__} cannot carry multi-stage round protocols")

    def transport_metrics(self) -> dict[str, float]:
        """Bytes on the wire since the last call (`bytes_down`: the server to clients, `bytes_up`: clients to
        the server, whole messages), for pools that send real messages; empty for in-process pools."""
        return {}

    def close(self) -> None:
        """Release workers and connections."""
