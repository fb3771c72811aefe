"""FLTrust (Cao et al. 2021): trust scores against the server's own update on a small clean root dataset."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._checks import check_stack

RootUpdate = Callable[[np.ndarray], np.ndarray]
"""Maps the round's flat global model to the server's own delta after training on its root data."""


class FLTrust:
    """Weight each update by ReLU(cosine with the server's root update), rescale it to the root update's
    norm, and average with those weights.

    Updates pointing away from the root update get weight 0, and rescaling removes any gain from
    boosting, so no bound on the number of Byzantine clients is assumed; instead the root dataset must be
    clean and representative of the task (`simulate` draws 100 samples from the clients' data, as the paper). When no
    update agrees with the root update the round's aggregate is zero (the model stays put).
    Example weights are ignored. The round loop hands the round's model to `begin_round` before
    aggregation, where the root update is computed.
    """

    name = "fltrust"
    streams = False  # needs every update of the round at once: the round loop keeps the stack
    min_updates = 1

    def __init__(self, root_update: RootUpdate) -> None:
        if not callable(root_update):
            raise ValueError("FLTrust needs root_update: a function from the flat global model to the server's "
                             "own update on its root dataset")
        self.root_update = root_update
        self.reference: np.ndarray | None = None

    def begin_round(self, params: np.ndarray) -> None:
        """Compute the server's update on the root data from this round's global model."""
        self.reference = np.asarray(self.root_update(params), dtype=np.float64)

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        if self.reference is None or self.reference.shape != deltas.shape[1:]:
            raise ValueError("FLTrust has no root update of the right size for this round; the round loop must "
                             "call begin_round(params) before aggregating")
        ref_norm = float(np.linalg.norm(self.reference))
        norms = np.maximum(np.linalg.norm(deltas, axis=1), np.finfo(float).tiny)
        trust = np.maximum(deltas @ self.reference / (norms * max(ref_norm, np.finfo(float).tiny)), 0.0)
        if trust.sum() == 0:
            return np.zeros(deltas.shape[1])
        return (trust * ref_norm / norms) @ deltas / trust.sum()
