"""`ProcessPool`: fit, evaluation and protocol stages dealt over one forked worker process per core.

Workers are forked when the pool is made, so each inherits the local pool and, through it, `client_fn`,
the client data and the protocol handlers, shared copy-on-write with this process instead of copied per
task, and a copy of the run's transforms. Each call sends the operation's name, the encoded global state
(encoded once) and the worker's share down a pipe as raw bytes in fedlearn's tensor format (nothing is
pickled), and reads back one message with the share's answers (see `workers.py` for who goes where).
Results are those of the sequential pool with one torch thread per process: every worker runs one thread,
since torch's CPU kernels may round differently with another thread count.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Hashable, Mapping, Sequence
from multiprocessing.connection import Connection

import torch

from ..transforms.base import Transform
from ..types import State
from .inprocess import InProcessPool
from .workers import OffloadingPool, serve, state_frame

log = logging.getLogger(__name__)


class ProcessPool(OffloadingPool):
    """Runs `local` (a sequential or vectorised in-process pool) in `workers` forked processes
    (default: one per core). `transforms` are the run's: protocol stages that train run their client halves
    in the workers (see `workers.py`)."""

    def __init__(self, local: InProcessPool, workers: int | None = None, transforms: Sequence[Transform] = ()) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("the process backend needs the 'fork' start method (Linux); use backend 'ray' here")
        super().__init__(local, transforms)
        self.size = workers or os.cpu_count() or 1
        if self.size < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._procs: list[tuple[multiprocessing.Process, Connection] | None] = [None] * self.size
        for slot in range(self.size):
            self._start(slot)

    def _workers(self) -> list[Hashable]:
        return list(range(self.size))  # a dead worker is restarted in its slot on the next call

    def _send(self, op: str, state: State | None, frames: Mapping[Hashable, bytes]) -> dict[Hashable, bytes | Exception]:
        head = state_frame(state)
        for slot, frame in frames.items():
            _, conn = self._worker(slot)
            for part in (op.encode(), head, frame):
                conn.send_bytes(part)
        answers: dict[Hashable, bytes | Exception] = {}
        for slot in frames:
            try:
                answers[slot] = self._worker(slot)[1].recv_bytes()
            except (EOFError, OSError) as exc:
                log.warning("worker process %d failed (%s: %s); restarting it", slot, type(exc).__name__, exc)
                self._stop(slot)
                answers[slot] = RuntimeError(f"worker process died: {type(exc).__name__}: {exc}")
        return answers

    def close(self) -> None:
        for slot, worker in enumerate(self._procs):
            if worker is not None:
                self._stop(slot)
        super().close()

    def _worker(self, slot: int) -> tuple[multiprocessing.Process, Connection]:
        if self._procs[slot] is None:
            self._start(slot)
        return self._procs[slot]  # type: ignore[return-value]

    def _start(self, slot: int) -> None:
        ctx = multiprocessing.get_context("fork")  # inherit client data; no pickled target or arguments
        parent, child = ctx.Pipe()
        parent_ends = [parent] + [w[1] for w in self._procs if w is not None]  # the child must not keep these
        process = ctx.Process(target=_serve, args=(child, self.local, self.transforms, parent_ends),
                              name=f"fedlearn-worker-{slot}", daemon=True)
        process.start()
        child.close()
        self._procs[slot] = (process, parent)

    def _stop(self, slot: int) -> None:
        process, conn = self._procs[slot]  # type: ignore[misc]
        conn.close()  # the worker sees EOF and exits
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
        self._procs[slot] = None


def _serve(conn: Connection, local: InProcessPool, transforms: Sequence[Transform], parent_ends: list[Connection]) -> None:
    """Worker loop: (operation, state, share) in, all answers out as one message, until the pipe closes.
    `parent_ends` are the pool's ends of this and earlier workers' pipes, inherited by the fork; closing
    them here lets each worker see EOF when the pool closes its end."""
    for end in parent_ends:
        end.close()
    torch.set_num_threads(1)
    while True:
        try:
            op, head, frame = conn.recv_bytes(), conn.recv_bytes(), conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(serve(local, transforms, op.decode(), head, frame))
