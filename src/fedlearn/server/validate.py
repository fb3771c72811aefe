"""Checks every update passes before it may touch the aggregate: right client, round, shape, finite values."""
from __future__ import annotations

import numpy as np

from ..types import Update


def update_problem(update: Update, *, expected_client: str, rnd: int, size: int) -> str | None:
    """Return why `update` must be rejected, or None when it is acceptable."""
    if update.client_id != expected_client:
        return f"claims to be client {update.client_id!r} but was sent to {expected_client!r}"
    if update.round != rnd:
        return f"is for round {update.round}, current round is {rnd}"
    delta = update.delta
    if not isinstance(delta, np.ndarray) or delta.dtype.kind != "f":
        return f"delta must be a floating-point numpy array, got {type(delta).__name__}"
    if delta.shape != (size,):
        return f"delta has shape {delta.shape}, the model layout needs ({size},)"
    if not np.isfinite(delta).all():
        return f"delta has {int((~np.isfinite(delta)).sum())} non-finite values (NaN/Inf)"
    if not isinstance(update.num_examples, (int, np.integer)) or update.num_examples <= 0:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    return None
