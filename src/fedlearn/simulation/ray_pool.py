"""`RayPool`: the cohort dealt over Ray actors, on this machine (`ray.init()`) or a cluster (`address=`).

Each actor receives the local pool (and with it `client_fn` and whatever data it closes over) once, when it
starts, from one copy in Ray's object store; Ray ships that by its own serializer, the one thing here that
fedlearn does not encode itself.
Per round the global state is put in Ray's object store once, encoded in fedlearn's tensor format, and
every actor gets a reference to it plus its share of the instructions; its answers come back as one
encoded message. Actors run one torch thread each, so results equal the sequential pool's with one
thread. Evaluation and multi-stage protocols run in the driver on the local pool.
Install with ``pip install fedlearn[ray]``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from ..serialize import encode_state
from ..transforms.base import Transform
from ..types import Config, Failure, State, Update
from .inprocess import InProcessPool
from .workers import OffloadingPool, decode_results, encode_instructions, finish_in_order, serve_fit, shares

log = logging.getLogger(__name__)


class _Worker:
    """Ray actor body: holds a local pool and answers a share of each round."""

    def __init__(self, local: InProcessPool) -> None:
        import torch

        torch.set_num_threads(1)
        self.local = local

    def fit(self, state_frame: bytes, instructions_frame: bytes) -> bytes:
        return serve_fit(self.local, state_frame, instructions_frame)


class RayPool(OffloadingPool):
    """Runs `local` (a sequential or vectorised in-process pool) in `workers` Ray actors of one CPU each
    (default: one per CPU Ray reports). Starts Ray unless it is already running; `address` joins a cluster
    ("auto" or "ray://head:10001"), `num_cpus` caps a local instance."""

    def __init__(
        self,
        local: InProcessPool,
        *,
        address: str | None = None,
        workers: int | None = None,
        num_cpus: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError("the ray backend needs Ray: pip install 'fedlearn[ray]'") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address or None, num_cpus=None if address else num_cpus,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        super().__init__(local)
        self.size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1, max_restarts=3)(_Worker)  # a dead actor comes back for later rounds
        self._local_ref = ray.put(local)  # serialized once for all actors, and kept alive for their restarts
        self._actors = [actor.remote(self._local_ref) for _ in range(self.size)]

    def fit(
        self, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform] = ()
    ) -> list[Update | Failure]:
        ray = self._ray
        state_ref = ray.put(encode_state(state))
        dealt = shares(instructions, self.size)
        calls = [a.fit.remote(state_ref, encode_instructions(share)) for a, share in zip(self._actors, dealt)]
        raw: dict[str, Update | Failure] = {}
        for call, share in zip(calls, dealt):
            try:
                raw.update(zip(share, decode_results(ray.get(call))))
            except Exception as exc:  # an actor died or sent garbage: its clients crashed this round
                log.warning("ray worker failed: %s: %s", type(exc).__name__, exc)
                raw.update({cid: Failure(cid, "crash", f"ray worker failed: {type(exc).__name__}: {exc}")
                            for cid in share})
        return finish_in_order(raw, instructions, transforms)

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()
        super().close()
