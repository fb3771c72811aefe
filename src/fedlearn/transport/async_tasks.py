"""Asynchronous (FedBuff) tasks over a deployment's `RemotePool` that survive a server restart.

`RemoteExecutor` is the durable executor of `AsyncServer`: every task is named by a nonce before it is sent,
and the driver keeps the tasks it is owed in the run store. A restarted server loads them and sends each
again, under the same nonce and with the model version it was first sent with (the store keeps every
version), to its client as soon as that client reconnects. A client that still holds the unacknowledged
result answers at once; one that lost it trains again from the same model and config. Either way the
result counts with its true staleness (steps since its version). Any other result from before the restart
names a nonce this server never issued again and is refused with that reason.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..server.async_loop import Task, ThreadExecutor
from ..transforms.base import Transform
from ..types import State
from .remote_pool import RemotePool
from .wire import NONCE_BYTES


class RemoteExecutor(ThreadExecutor):
    """`ThreadExecutor` over a `RemotePool` whose tasks are resumed after a restart (see the module docstring).
    A resumed task waits for its client to reconnect within the pool's round deadline, then fails as a
    timeout and frees the client's slot."""

    durable = True

    def __init__(self, pool: RemotePool, poll_seconds: float = 1.0) -> None:
        super().__init__(pool, pool.connected, poll_seconds)

    def new_nonce(self) -> str:
        return os.urandom(NONCE_BYTES).hex()

    def start(self, task: Task, state: State, transforms: Sequence[Transform]) -> None:
        self._send(task, state, transforms, await_client=False)

    def resume(self, task: Task, state: State, transforms: Sequence[Transform]) -> bool:
        if not task.nonce:
            return False
        self._send(task, state, transforms, await_client=True)
        return True

    def _send(self, task: Task, state: State, transforms: Sequence[Transform], *, await_client: bool) -> None:
        nonce = bytes.fromhex(task.nonce)
        self._launch(task, lambda: self.pool.fit(state, {task.client_id: task.config}, transforms,
                                                 nonces={task.client_id: nonce}, await_clients=await_client)[0])
