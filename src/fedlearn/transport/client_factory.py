"""Where a client process gets its `Client`: client k of N of a built-in data set (the same partition a
simulation with the same settings gives client k), or the user's own factory named as `module:function`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..client import Client
from ..config import ConfigError, SimulationConfig
from ..plugins import load_object


def builtin_client(cfg: SimulationConfig, index: int, client_id: str) -> Client:
    """Client number `index` of `cfg.num_clients` on the configured built-in data, answering as `client_id`."""
    from ..simulate import builtin_app  # imports torch; only built-in clients need it

    if cfg.attack:
        raise ConfigError("attacks are simulated only; a client process trains on its own data as it is")
    app = builtin_app(cfg)
    ids = app.simulated_client_ids
    if not 0 <= index < len(ids):
        raise ConfigError(f"--client-index must be in 0..{len(ids) - 1} for {len(ids)} clients, got {index}")
    client = app.client(ids[index])
    client.cid = client_id  # the authenticated identity, whatever the partition's number
    return client


def user_client(spec: str, client_id: str, params: dict[str, Any], app_dir: str | Path = ".") -> Client:
    """Call the user's factory as `factory(client_id, **params)` and check it returned a `Client`."""
    factory = load_object(spec, app_dir, "--client-module")
    try:
        client = factory(client_id, **params)
    except TypeError as exc:  # a --client-arg the factory does not take, or one it misses
        raise ConfigError(f"{spec}: {exc} (--client-arg given: {', '.join(sorted(params)) or 'none'})") from None
    if not isinstance(client, Client):
        raise ConfigError(f"{spec} returned {type(client).__name__}, not a fedlearn.Client")
    if client.cid != client_id:
        raise ConfigError(f"{spec} returned a client named {client.cid!r}; its credentials say {client_id!r}")
    return client
