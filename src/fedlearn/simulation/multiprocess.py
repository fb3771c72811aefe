"""`ProcessPool`: the cohort dealt over one forked worker process per core.

Workers are forked when the pool is made, so each inherits the local pool and, through it, `client_fn`
and the client data, shared copy-on-write with this process instead of copied per task. Each round
sends the encoded global state (encoded once) and a share of the instructions down a pipe as raw bytes in
fedlearn's tensor format (nothing is pickled), and reads back one message with the share's results. Results are those of
the sequential pool with one torch thread per process: every worker runs one thread, since torch's CPU
kernels may round differently with another thread count. Evaluation and multi-stage protocols run in this
process on the local pool.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection

import torch

from ..serialize import SerializationError, encode_state
from ..transforms.base import Transform
from ..types import Config, Failure, State, Update
from .inprocess import InProcessPool
from .workers import OffloadingPool, decode_results, encode_instructions, finish_in_order, serve_fit, shares

log = logging.getLogger(__name__)


class ProcessPool(OffloadingPool):
    """Runs `local` (a sequential or vectorised in-process pool) in `workers` forked processes
    (default: one per core)."""

    def __init__(self, local: InProcessPool, workers: int | None = None) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("the process backend needs the 'fork' start method (Linux); use backend 'ray' here")
        super().__init__(local)
        self.size = workers or os.cpu_count() or 1
        if self.size < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._workers: list[tuple[multiprocessing.Process, Connection] | None] = [None] * self.size
        for slot in range(self.size):
            self._start(slot)

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        state_frame = encode_state(state)
        dealt = shares(instructions, self.size)
        for slot, share in enumerate(dealt):
            _, conn = self._worker(slot)
            conn.send_bytes(state_frame)
            conn.send_bytes(encode_instructions(share))
        raw: dict[str, Update | Failure] = {}
        for slot, share in enumerate(dealt):
            raw.update(self._answers(slot, share))
        return finish_in_order(raw, instructions, transforms)

    def close(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                self._stop(slot)
        super().close()

    def _answers(self, slot: int, share: Mapping[str, Config]) -> dict[str, Update | Failure]:
        """One worker's results by client id; if the worker died, its clients crashed and it is replaced."""
        _, conn = self._worker(slot)
        try:
            return dict(zip(share, decode_results(conn.recv_bytes())))
        except (EOFError, OSError, SerializationError) as exc:
            log.warning("worker process %d failed (%s: %s); restarting it", slot, type(exc).__name__, exc)
            self._stop(slot)
            return {cid: Failure(cid, "crash", f"worker process died: {type(exc).__name__}: {exc}") for cid in share}

    def _worker(self, slot: int) -> tuple[multiprocessing.Process, Connection]:
        if self._workers[slot] is None:
            self._start(slot)
        return self._workers[slot]  # type: ignore[return-value]

    def _start(self, slot: int) -> None:
        ctx = multiprocessing.get_context("fork")  # inherit client data; no pickled target or arguments
        parent, child = ctx.Pipe()
        parent_ends = [parent] + [w[1] for w in self._workers if w is not None]  # the child must not keep these
        process = ctx.Process(target=_serve, args=(child, self.local, parent_ends), name=f"fedlearn-worker-{slot}",
                              daemon=True)
        process.start()
        child.close()
        self._workers[slot] = (process, parent)

    def _stop(self, slot: int) -> None:
        process, conn = self._workers[slot]  # type: ignore[misc]
        conn.close()  # the worker sees EOF and exits
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
        self._workers[slot] = None


def _serve(conn: Connection, local: InProcessPool, parent_ends: list[Connection]) -> None:
    """Worker loop: (state, instructions) in, all results out as one message, until the pipe closes.
    `parent_ends` are the pool's ends of this and earlier workers' pipes, inherited by the fork; closing
    them here lets each worker see EOF when the pool closes its end."""
    for end in parent_ends:
        end.close()
    torch.set_num_threads(1)
    while True:
        try:
            state_frame, instructions_frame = conn.recv_bytes(), conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(serve_fit(local, state_frame, instructions_frame))
