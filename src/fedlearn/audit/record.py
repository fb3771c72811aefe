"""What one audit record says about a committed round, and the hash of each accepted update."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..types import Failure, Update


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def update_digest(update: Update) -> str:
    """SHA-256 of the update's vector as the aggregator received it (under secure aggregation: the masked
    input), over its raw little-endian bytes."""
    vector = np.ascontiguousarray(update.delta)
    return digest(vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes())


def update_hashes(updates: list[Update]) -> dict[str, str]:
    """Client id -> the hash of its accepted update. A client with several updates in one asynchronous
    server step (a fast client under FedBuff) gets their hashes comma-separated, in the order they were taken."""
    out: dict[str, list[str]] = {}
    for update in updates:
        out.setdefault(update.client_id, []).append(update_digest(update))
    return {cid: ",".join(hashes) for cid, hashes in out.items()}


def round_record(*, log_id: str, rnd: int, model_before: str | None, model_after: str, config: str,
                 accepted: dict[str, str], failures: list[Failure], epsilon: float | None, version: str,
                 contributions: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """The record of round `rnd`: hashes of the model before and after, of the configuration and of each
    accepted client's update; refused and flagged clients with their reasons; privacy spent; versions."""
    record: dict[str, Any] = {
        "log": log_id, "round": rnd, "model_before": model_before, "model_after": model_after, "config": config,
        "accepted": dict(sorted(accepted.items())),
        "refused": [{"client": f.client_id, "kind": f.kind, "reason": f.reason} for f in failures],
        "epsilon": epsilon, "fedlearn": version,
    }
    if contributions:
        record["contributions"] = {cid: dict(sorted(s.items())) for cid, s in sorted(contributions.items())}
    return record
