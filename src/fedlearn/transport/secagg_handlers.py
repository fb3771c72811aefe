"""Secure aggregation in a client process: `SecAggClient`'s stage handlers, signing key advertisements and
survivor sets with the client's own Ed25519 identity key (the one it authenticates to the server with).

Neighbours' signatures are checked against identity public keys from one of two places:
- the server's allow-list, sent with each round's plan. This defends against an honest-but-curious
  server and against anyone between the clients and the server, but a malicious server could announce
  keys of its own making;
- a pinned allow-list (`fedlearn client --peer-keys`), distributed to clients out of band. Then even the
  server cannot impersonate a client in the key exchange. `fedlearn client --peer-keys` also refuses sparse
  graphs (`ClientPolicy.full_graph_only`): against a malicious server only the full graph is claimed safe.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..messages import ClientSession, Handler, Message
from ..secagg import SecAggClient, SecAggError
from ..secagg.protocol import ADVERTISE, IDENTITY_KEYS, ClientPolicy
from .identity import AllowList, Identity


def load_peer_keys(path: str | Path) -> dict[str, bytes]:
    """Identity public keys of every registered client, from an allow-list file."""
    return {cid: bytes.fromhex(hex_key) for cid, hex_key in AllowList.load(path).keys.items()}


def secagg_handlers(client_id: str, identity: Identity, pinned: Mapping[str, bytes] | None = None,
                    policy: ClientPolicy = ClientPolicy()) -> dict[str, Handler]:
    """Handlers for the secure-aggregation stages of client `client_id`. With `pinned` (from
    `load_peer_keys`) the keys the server announces are ignored; otherwise they are taken each round,
    after checking that the server announces this client's own key correctly."""
    registry: dict[str, bytes] = dict(pinned or {})

    def sign(cid: str, message: bytes) -> bytes:
        if cid != client_id:
            raise SecAggError(f"client {client_id!r} was asked to sign as {cid!r}")
        return identity.sign(message)

    handlers = SecAggClient(sign, registry, policy).handlers()
    advertise = handlers[ADVERTISE]

    def advertise_with_server_keys(session: ClientSession, message: Message) -> Message:
        if pinned is None:
            registry.clear()
            registry.update(_announced_keys(message.meta, client_id, identity))
        return advertise(session, message)

    handlers[ADVERTISE] = advertise_with_server_keys
    return handlers


def _announced_keys(meta: Mapping, client_id: str, identity: Identity) -> dict[str, bytes]:
    announced = meta.get(IDENTITY_KEYS)
    if not isinstance(announced, dict):
        raise SecAggError("the round plan carries no identity keys; start the client with --peer-keys ALLOWLIST")
    try:
        keys = {str(cid): bytes.fromhex(str(hex_key)) for cid, hex_key in announced.items()}
    except ValueError:
        raise SecAggError("the round plan's identity keys are not hex") from None
    if keys.get(client_id, b"").hex() != identity.public_hex:
        raise SecAggError(f"the server announced an identity key for {client_id!r} that is not this client's own; "
                          "refusing to take part in secure aggregation with its key registry")
    return keys
