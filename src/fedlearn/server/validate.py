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
    vectors = {"delta": update.delta, **{f"extra {k!r}": v for k, v in update.extras.items()}}
    for name, vector in vectors.items():
        if not isinstance(vector, np.ndarray) or vector.dtype.kind != "f":
            return f"{name} must be a floating-point numpy array, got {type(vector).__name__}"
        if vector.shape != (size,):
            return f"{name} has shape {vector.shape}, the model layout needs ({size},)"
        if not np.isfinite(vector).all():
            return f"{name} has {int((~np.isfinite(vector)).sum())} non-finite values (NaN/Inf)"
    if not isinstance(update.num_examples, (int, np.integer)) or update.num_examples <= 0:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    return None
