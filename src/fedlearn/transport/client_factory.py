"""Where a client process gets its `Client`: client k of N of a built-in data set (the same partition a
simulation with the same settings gives client k), or the user's own factory named as `module:function`."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..client import Client
from ..config import ConfigError, SimulationConfig


def builtin_client(cfg: SimulationConfig, index: int, client_id: str) -> Client:
    """Client number `index` of `cfg.num_clients` on the configured built-in data, answering as `client_id`."""
    from ..simulate import builtin_task  # imports torch; only built-in clients need it

    if cfg.attack:
        raise ConfigError("attacks are simulated only; a client process trains on its own data as it is")
    task = builtin_task(cfg)
    ids = task.data.client_ids
    if not 0 <= index < len(ids):
        raise ConfigError(f"--client-index must be in 0..{len(ids) - 1} for {len(ids)} clients, got {index}")
    client = task.client(ids[index])
    client.cid = client_id  # the authenticated identity, whatever the partition's number
    return client


def load_factory(spec: str, app_dir: str | Path = ".") -> Callable[..., Client]:
    """The function named by 'package.module:function', importable from `app_dir` or the Python path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--client-module must look like 'package.module:function', got {spec!r}")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"cannot import {module_name!r} for --client-module: {exc}") from None
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no function {attr!r}") from None
    if not callable(factory):
        raise ConfigError(f"{spec} is not callable")
    return factory


def user_client(spec: str, client_id: str, params: dict[str, Any], app_dir: str | Path = ".") -> Client:
    """Call the user's factory as `factory(client_id, **params)` and check it returned a `Client`."""
    client = load_factory(spec, app_dir)(client_id, **params)
    if not isinstance(client, Client):
        raise ConfigError(f"{spec} returned {type(client).__name__}, not a fedlearn.Client")
    if client.cid != client_id:
        raise ConfigError(f"{spec} returned a client named {client.cid!r}; its credentials say {client_id!r}")
    return client
