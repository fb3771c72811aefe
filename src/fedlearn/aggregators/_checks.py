"""Shared argument checks for robust aggregators: every refusal names the setting and what would work."""
from __future__ import annotations

import numpy as np


def check_stack(deltas: np.ndarray, weights: np.ndarray) -> None:
    """Refuse anything but a non-empty `(n, d)` stack with one weight per row."""
    if deltas.ndim != 2 or deltas.shape[0] == 0:
        raise ValueError(f"aggregators take a non-empty (n, d) stack of deltas, got shape {deltas.shape}")
    if weights.shape != (deltas.shape[0],):
        raise ValueError(f"expected {deltas.shape[0]} weights (one per delta), got shape {weights.shape}")


def check_enough(name: str, n: int, needed: int, rule: str) -> None:
    """Refuse a round with fewer updates than the aggregator's assumption needs."""
    if n < needed:
        raise ValueError(
            f"{name} needs at least {needed} updates per round ({rule}) but got {n}; "
            "sample more clients per round or assume fewer Byzantine clients (lower f)"
        )


def check_whole(what: str, value: int, minimum: int) -> int:
    """`value` as an int, refused unless it is a whole number >= `minimum` (`what` names it in the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_f(f: int) -> int:
    """`f`, the number of Byzantine clients assumed, as a non-negative int."""
    return check_whole("f (the number of Byzantine clients tolerated)", f, 0)
