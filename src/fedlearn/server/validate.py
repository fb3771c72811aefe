"""Checks every value a client sends before it may touch the round: right client and round, shape, finite
values, and counts and metrics of a credible type and size. Each check returns the reason a value must be
refused (or None), and never raises, whatever the value: a bad value costs its sender, never the round."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..types import Update

if TYPE_CHECKING:
    from ..strategies.base import Strategy

log = logging.getLogger(__name__)

MAX_COUNT = 2**53  # the largest example count accepted at all: float64 holds every integer up to it exactly
MAX_METRICS = 64
MAX_METRIC_NAME = 128


def describe(value: Any) -> str:
    """A short, safe rendering of a client-sent value for a reason text (huge integers are not printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def count_problem(value: Any, name: str = "num_examples", *, minimum: int = 1) -> str | None:
    """Why `value` is not an example count in [minimum, 2**53], or None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return f"{name} must be an integer, got {type(value).__name__} {describe(value)}"
    if not minimum <= value <= MAX_COUNT:
        return f"{name} must be in [{minimum}, 2**53], got {describe(value)}"
    return None


def number_problem(value: Any, name: str) -> str | None:
    """Why `value` is not a finite real number (int or float, not bool), or None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"{name} must be a number, got {type(value).__name__} {describe(value)}"
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        finite = False
    return None if finite else f"{name} must be finite, got {describe(value)}"


def metrics_problem(metrics: Any) -> str | None:
    """Why `metrics` is not a small mapping of names to finite numbers, or None."""
    if not isinstance(metrics, dict):
        return f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}"
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics exceed the limit of {MAX_METRICS}"
    for key, value in metrics.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METRIC_NAME:
            return f"metric name {describe(key)} must be a string of 1 to {MAX_METRIC_NAME} characters"
        problem = number_problem(value, f"metric {key!r}")
        if problem is not None:
            return problem
    return None


def update_problem(update: Update, *, expected_client: str, rnd: int, size: int) -> str | None:
    """Return why `update` must be rejected, or None when it is acceptable."""
    if update.client_id != expected_client:
        return f"claims to be client {update.client_id!r} but was sent to {expected_client!r}"
    if update.round != rnd:
        return f"is for round {update.round}, current round is {rnd}"
    if not isinstance(update.extras, dict):
        return f"extras must be a mapping of names to vectors, got {type(update.extras).__name__}"
    vectors = {"delta": update.delta, **{f"extra {k!r}": v for k, v in update.extras.items()}}
    for name, vector in vectors.items():
        if not isinstance(vector, np.ndarray) or vector.dtype.kind != "f":
            return f"{name} must be a floating-point numpy array, got {type(vector).__name__}"
        if vector.shape != (size,):
            return f"{name} has shape {vector.shape}, the model layout needs ({size},)"
        if not np.isfinite(vector).all():
            return f"{name} has {int((~np.isfinite(vector)).sum())} non-finite values (NaN/Inf)"
    problem = count_problem(update.num_examples) or metrics_problem(update.metrics)
    if problem is None and not isinstance(update.partial, (bool, np.bool_)):
        problem = f"partial must be true or false, got {describe(update.partial)}"
    return problem


def sum_norm_problem(total: np.ndarray, count: int, clip: float, slack: float = 0.0) -> str | None:
    """Why `total` cannot be the sum of `count` updates each clipped to L2 norm `clip` (plus `slack` for
    rounding and noise), or None: the one check of a client's influence left when only the sum is visible."""
    norm = float(np.linalg.norm(total))
    bound = count * clip + slack
    if not norm <= bound:
        return (f"the sum has L2 norm {norm:.4g}, more than {count} clients clipped to {clip:g} can reach "
                f"({bound:.4g}): a client did not clip")
    return None


def usable_problem(update: Update, strategy: "Strategy", *, expected_client: str, rnd: int, size: int) -> str | None:
    """`update_problem`, then what the strategy itself needs (`Strategy.update_problem`). A check that fails
    on a hostile value is a reason too: whatever a client sent, only that client pays for it."""
    try:
        return (update_problem(update, expected_client=expected_client, rnd=rnd, size=size)
                or strategy.update_problem(update))
    except Exception as exc:  # noqa: BLE001
        return f"could not be checked ({type(exc).__name__}: {exc})"[:500]


def capped(update: Update, max_examples: int | None) -> Update:
    """`update` with its example count, its weight in the mean, capped at `max_examples` (None: no cap)."""
    if max_examples is None or update.num_examples <= max_examples:
        return update
    log.info("round %d: client %s claims %d examples; its weight is capped at max_examples=%d", update.round,
             update.client_id, update.num_examples, max_examples)
    return dataclasses.replace(update, num_examples=max_examples)
