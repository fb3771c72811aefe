"""Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust Optimization")."""
from __future__ import annotations

import numpy as np

from ._checks import check_stack, check_whole
from .norm_bounding import clip_rows


class CenteredClipping:
    """Start from the previous round's aggregate v and repeat `iters` times:
    v <- v + mean_i clip(x_i - v, tau), where clip scales a vector down to norm tau.

    Each client can move v by at most tau / n per iteration, so a fraction delta of Byzantine clients shifts
    the result by at most delta * tau per iteration: it needs delta < 1/2, and the paper's analysis a small
    delta (around 0.1) with tau of the order of the honest updates' spread. `tau=None` uses the median
    distance of this round's updates to v, which adapts to their scale and is set by honest clients while
    f < n/2. Example weights are ignored.
    The center carries over between rounds and is saved with the strategy state, so a resumed run is exact.
    """

    name = "centered_clipping"
    streams = False  # needs every update of the round at once: the round loop keeps the stack
    min_updates = 1

    def __init__(self, tau: float | None = None, iters: int = 3) -> None:
        if tau is not None and not tau > 0:
            raise ValueError(f"centered clipping radius tau must be > 0 (or omitted for the adaptive median), "
                             f"got {tau}")
        self.tau, self.iters = tau, check_whole("centered clipping iters", iters, 1)
        self.center: np.ndarray | None = None

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        v = np.zeros(deltas.shape[1]) if self.center is None or self.center.shape != deltas.shape[1:] else self.center
        for _ in range(self.iters):
            diffs = deltas - v
            tau = float(np.median(np.linalg.norm(diffs, axis=1))) if self.tau is None else self.tau
            v = v + clip_rows(diffs, tau).mean(axis=0)
        self.center = v
        return v.copy()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.center is None else {"center": self.center.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.center = np.array(state["center"], dtype=np.float64) if "center" in state else None
