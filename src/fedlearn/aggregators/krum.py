"""Distance-based selection: Krum and Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018)."""
from __future__ import annotations

import numpy as np

from ._checks import check_enough, check_f, check_stack, check_whole


def pairwise_sq_distances(deltas: np.ndarray) -> np.ndarray:
    """(n, n) squared Euclidean distances between the rows of `deltas`."""
    sq = np.einsum("ij,ij->i", deltas, deltas)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * deltas @ deltas.T, 0.0)


def krum_scores(distances: np.ndarray, neighbours: int) -> np.ndarray:
    """Each row's sum of squared distances to its `neighbours` nearest other rows."""
    n = distances.shape[0]
    others = distances[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    return np.sort(others, axis=1)[:, :neighbours].sum(axis=1)


class Krum:
    """Average of the `m` updates with the lowest Krum score (m = 1 is Krum, m > 1 is Multi-Krum,
    m = None averages n - f of them).

    A score is the sum of squared distances to the n - f - 2 nearest other updates, so updates far from
    the honest cluster score badly. Tolerates f Byzantine clients when n >= 2f + 3. Example weights are
    ignored (the selected updates are averaged uniformly), so a client cannot buy influence by claiming
    many examples.
    """

    name = "krum"
    streams = False  # needs every update of the round at once: the round loop keeps the stack

    def __init__(self, f: int = 1, m: int | None = 1) -> None:
        self.f = check_f(f)
        self.m = None if m is None else check_whole("Multi-Krum m (how many updates to average)", m, 1)
        self.min_updates = max(2 * self.f + 3, self.m or 0)

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        n = deltas.shape[0]
        check_enough(f"Krum with f={self.f}", n, 2 * self.f + 3, "n >= 2f + 3")
        m = n - self.f if self.m is None else self.m
        check_enough(f"Multi-Krum with m={m}", n, m, "it averages m of the n updates")
        scores = krum_scores(pairwise_sq_distances(deltas), n - self.f - 2)
        chosen = np.argsort(scores, kind="stable")[:m]
        return deltas[chosen].mean(axis=0)


class Bulyan:
    """Krum selection followed by a coordinate-wise trimmed mean around the median.

    Repeatedly picks the Krum winner of the remaining updates until theta = n - 2f are selected; then, per
    coordinate, averages the beta = theta - 2f selected values closest to their median. Tolerates f
    Byzantine clients only when n >= 4f + 3, and refuses to run otherwise. Example weights are ignored.
    """

    name = "bulyan"
    streams = False  # needs every update of the round at once: the round loop keeps the stack

    def __init__(self, f: int = 1) -> None:
        self.f = check_f(f)
        self.min_updates = 4 * self.f + 3

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        n, f = deltas.shape[0], self.f
        check_enough(f"Bulyan with f={f}", n, 4 * f + 3, f"n >= 4f + 3 = {4 * f + 3}")
        distances = pairwise_sq_distances(deltas)
        remaining = list(range(n))
        selected: list[int] = []
        for _ in range(n - 2 * f):
            sub = distances[np.ix_(remaining, remaining)]
            best = int(np.argmin(krum_scores(sub, max(len(remaining) - f - 2, 1))))
            selected.append(remaining.pop(best))
        chosen = deltas[selected]
        beta = len(selected) - 2 * f
        closest = np.argsort(np.abs(chosen - np.median(chosen, axis=0)), axis=0, kind="stable")[:beta]
        return np.take_along_axis(chosen, closest, axis=0).mean(axis=0)
