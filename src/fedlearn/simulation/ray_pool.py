"""`RayPool`: the cohort dealt over Ray actors, on this machine (`ray.init()`) or a cluster (`address=`).

The local pool (and with it `client_fn`, the protocol handlers and whatever data they close over) and the run's
transforms are put in Ray's object store once, when the pool starts; every actor is built from that one
object, which Ray copies to each node once, however many actors the node runs (Ray ships it by its own
serializer, the one thing here that fedlearn does not encode itself). Per call (fit, evaluation, protocol
stage) the global state is put in the object store once, encoded in fedlearn's tensor format, and every live
actor gets a reference to it plus its share; its answers come back as one encoded message (see `workers.py`
for who goes where). `round_bytes` counts what each fit hands to Ray, `setup_bytes` the one-off copy.
Actors run one torch thread each, so results equal the sequential pool's with one thread.

An actor that dies (its process or its whole node) costs the clients it held that round: they fail as
crashes, the actor is dropped and a replacement is requested, which takes part from the first round after
Ray has found room for it.
Install with ``pip install fedlearn[ray]``.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Hashable, Mapping, Sequence

from ..transforms.base import Transform
from ..types import State
from .inprocess import InProcessPool
from .workers import OffloadingPool, serve, state_frame

log = logging.getLogger(__name__)

_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_FORMS = re.compile(rf"(?:ray://)?{_HOST}:(\d{{1,5}})|ray://{_HOST}")
_AUTH_HELP = (
    "run with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token, in the file named by "
    "RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN (README, 'Speed and scale')"
)


def check_ray_address(address: str) -> str:
    """`address` if it is a form Ray can join, else ValueError: "auto" (the cluster started on this
    machine, or the one in RAY_ADDRESS), "HOST:PORT" (the head's port given to `ray start --head`, 6379 by
    default) or "ray://HOST[:PORT]" (Ray Client, port 10001 by default)."""
    match = _FORMS.fullmatch(address) if isinstance(address, str) else None
    port = match and match.group(2)
    if address == "auto" or (match and (port is None or 1 <= int(port) <= 65535)):
        return address
    raise ValueError(
        f"ray address {address!r} is not one Ray can join; give 'auto' (a cluster started on this machine), "
        "HEAD_HOST:PORT (the port of `ray start --head`, e.g. 10.0.0.5:6379) or ray://HEAD_HOST:10001 (Ray Client); "
        "leave it empty to start Ray on this machine"
    )


class _Worker:
    """Ray actor body: holds a local pool and the run's transforms, and answers its share of each call."""

    def __init__(self, shipped: tuple[InProcessPool, tuple[Transform, ...]]) -> None:
        import torch

        torch.set_num_threads(1)
        self.local, self.transforms = shipped

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, op: str, head: bytes, frame: bytes) -> bytes:
        return serve(self.local, self.transforms, op, head, frame)


class RayPool(OffloadingPool):
    """Runs `local` (a sequential or vectorised in-process pool) in `workers` Ray actors of one CPU each
    (default: one per CPU Ray reports). Starts Ray unless it is already running; `address` joins a cluster
    (see `check_ray_address`), `num_cpus` caps a local instance. A round with no live actor waits up to
    `start_timeout` seconds for one, then fails its clients. `transforms` are the run's: protocol stages that
    train run their client halves in the actors (see `workers.py`)."""

    def __init__(
        self,
        local: InProcessPool,
        *,
        address: str | None = None,
        workers: int | None = None,
        num_cpus: int | None = None,
        start_timeout: float = 120.0,
        transforms: Sequence[Transform] = (),
    ) -> None:
        if address:
            check_ray_address(address)
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        try:
            import ray
        except ImportError:
            raise ImportError("the ray backend needs Ray: pip install 'fedlearn[ray]'") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _connect(ray, address, num_cpus)
        super().__init__(local, transforms)
        self.size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.start_timeout = start_timeout
        self._actor_class = ray.remote(num_cpus=1, max_restarts=0)(_Worker)  # a dead actor is replaced, not revived
        self._local_ref = ray.put((local, self.transforms))  # serialized once, copied once to each node that runs one
        self.setup_bytes = _object_size(ray, self._local_ref)
        self.round_bytes: list[int] = []  # per fit call: encoded state + instructions handed to Ray
        self._first = True  # the first call waits for every actor to start
        self._live: dict[object, str] = {}  # actor -> node id
        self._starting: dict[object, object] = {}  # actor -> reference to its node id, once it runs
        for _ in range(self.size):
            self._spawn()

    def _workers(self) -> list[Hashable]:
        self._admit(first=self._first)
        self._first = False
        return list(self._live)

    def _no_worker_reason(self) -> str:
        return f"no Ray worker is alive ({len(self._starting)} waiting for room in the cluster)"

    def _label(self, actor: Hashable) -> str:
        return self._live.get(actor, "")  # the node id

    def _send(self, op: str, state: State | None, frames: Mapping[Hashable, bytes]) -> dict[Hashable, bytes | Exception]:
        ray = self._ray
        state_ref = ray.put(state_frame(state))
        if op == "fit":
            self.round_bytes.append(_object_size(ray, state_ref) + sum(len(f) for f in frames.values()))
        calls = {actor: actor.run.remote(op, state_ref, frame) for actor, frame in frames.items()}
        answers: dict[Hashable, bytes | Exception] = {}
        for actor, call in calls.items():
            try:
                answers[actor] = ray.get(call)
            except Exception as exc:  # its actor died: its clients crashed this call
                log.warning("ray worker on node %s failed: %s: %s", self._live[actor][:8], type(exc).__name__, exc)
                answers[actor] = exc
                if isinstance(exc, ray.exceptions.RayActorError):
                    self._replace(actor)
        return answers

    def close(self) -> None:
        for actor in [*self._live, *self._starting]:
            self._ray.kill(actor, no_restart=True)
        self._live, self._starting = {}, {}
        if self._owns_ray:
            self._ray.shutdown()
        super().close()

    def _spawn(self) -> None:
        actor = self._actor_class.remote(self._local_ref)
        self._starting[actor] = actor.node.remote()

    def _replace(self, actor: object) -> None:
        del self._live[actor]
        self._ray.kill(actor, no_restart=True)
        self._spawn()

    def _admit(self, first: bool) -> None:
        """Move actors that have started into the live set. Before the first round: all of them (up to
        `start_timeout`; one that cannot start is an error, usually a `client_fn` the workers cannot import);
        with no live actor: the first to start; otherwise those ready now, so a replacement that finds no room
        in the cluster never holds up a round."""
        ray, wait = self._ray, first or not self._live
        deadline = time.monotonic() + (self.start_timeout if wait else 0.0)
        admitted = 0
        while self._starting:
            refs = {ref: actor for actor, ref in self._starting.items()}
            ready, _ = ray.wait(list(refs), num_returns=1 if wait and not first else len(refs),
                                timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                actor = refs[ref]
                del self._starting[actor]
                try:
                    self._live[actor] = ray.get(ref)
                    admitted += 1
                except ray.exceptions.RayActorError as exc:
                    if first:
                        raise RuntimeError(f"a Ray worker could not start (define client_fn in the script you run or "
                                           f"in a module every node can import): {exc}") from None
                    log.warning("a replacement ray worker could not start: %s", exc)
                    self._spawn()
            if not wait or (self._live and not first) or time.monotonic() >= deadline:
                break
        if wait and self._starting:
            log.warning("%d of %d ray workers have not started after %.0f s; going on with %d", len(self._starting),
                        self.size, self.start_timeout, len(self._live))
        if admitted:
            log.info("ray: %d workers on %d nodes", len(self._live), len(set(self._live.values())))


CLIENT_SERVER_TRIES = 3


def _connect(ray, address: str | None, num_cpus: int | None) -> None:
    """`ray.init`, with a message saying what to do when the cluster wants a token this process lacks (Ray
    reports a missing or wrong token as an authentication error, or only as a failed connection)."""
    auth_error = getattr(ray.exceptions, "AuthenticationError", ())
    try:
        for attempt in range(CLIENT_SERVER_TRIES):
            try:
                ray.init(address=address or None, num_cpus=None if address else num_cpus,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
                break
            except ConnectionError as exc:
                # Ray Client: the head starts a server process for each driver, and on a busy head that start
                # can fail once; a new connection asks for a new one.
                if "Starting Ray client server failed" not in str(exc) or attempt + 1 == CLIENT_SERVER_TRIES:
                    raise
                log.warning("Ray Client: the head could not start this driver's server (%s); trying again", exc)
                time.sleep(2.0)
    except auth_error as exc:
        raise RuntimeError(f"the Ray cluster refused this driver's token: {_AUTH_HELP}; Ray said: {exc}") from None
    except ConnectionError as exc:
        raise ConnectionError(f"could not join the Ray cluster at {address!r} ({exc}): check the address and that "
                              f"the head is up (`ray status` there); if it uses token authentication, {_AUTH_HELP}"
                              ) from None


def _object_size(ray, ref) -> int:
    """Bytes Ray holds for `ref` (data and metadata), as Ray itself reports it."""
    try:
        return int(ray.experimental.get_object_locations([ref])[ref]["object_size"])
    except Exception:  # Ray Client does not report locations; the pool works the same without the count
        return 0
