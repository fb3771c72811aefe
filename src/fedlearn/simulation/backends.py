"""Pick a client pool by name: where and how simulated clients train."""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence

from ..config import BACKENDS
from ..messages import Handler
from ..server.pool import ClientPool
from ..transforms.base import Transform
from .faults import FaultInjector
from .inprocess import ClientFn, InProcessPool

# backend -> (module it imports, the fedlearn extra that installs it)
_EXTRAS = {"ray": ("ray", "ray")}


def backend_unavailable(backend: str) -> str | None:
    """Why `backend` cannot run here (its optional dependency is not installed, with the command that adds it),
    or None when it can; lets benchmarks and tools skip such a backend instead of failing on import."""
    module, extra = _EXTRAS.get(backend, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'fedlearn[{extra}]')"
    return None


def make_pool(
    backend: str,
    client_fn: ClientFn,
    client_ids: Sequence[str],
    faults: FaultInjector | None = None,
    *,
    handlers: Mapping[str, Handler] | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    transforms: Sequence[Transform] = (),
) -> ClientPool:
    """"sequential": one client after another in this process (the reference); "vectorized": each cohort of
    PyTorch clients trained at once with torch.func; "process": one forked worker per core; "ray": Ray actors,
    local or on the cluster at `ray_address`. All give the sequential pool's results (the process and Ray
    workers run one torch thread each, so compare with a sequential run on one thread). `transforms` are the
    run's: the process and Ray workers need them to run protocol stages that train."""
    if backend == "sequential":
        return InProcessPool(client_fn, client_ids, faults, handlers)
    if backend == "vectorized":
        from .vectorized import VectorizedPool

        return VectorizedPool(client_fn, client_ids, faults, handlers)
    if backend == "process":
        from .multiprocess import ProcessPool

        return ProcessPool(InProcessPool(client_fn, client_ids, faults, handlers), workers, transforms)
    if backend == "ray":
        from .ray_pool import RayPool

        return RayPool(InProcessPool(client_fn, client_ids, faults, handlers), address=ray_address, workers=workers,
                       transforms=transforms)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
