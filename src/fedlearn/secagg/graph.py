"""Who masks with whom. The full graph (SecAgg) pairs every client with every other; the sparse graph
(SecAgg+, Bell et al. 2020) is a Harary graph over a pseudo-random order of the cohort, so each client has
`degree` neighbours and the cost per client grows with the degree instead of the cohort.

The order is SHA-256 of (seed, client id), so every client recomputes the same graph from the round plan
(cohort, degree, seed) on any platform: nobody has to take a neighbour list on the server's word."""
from __future__ import annotations

import hashlib
import math


def default_degree(cohort: int) -> int:
    """An even degree of about 6 log2(n), enough for a majority of each neighbourhood to survive typical
    dropout; the full graph when the cohort is that small anyway."""
    return min(cohort - 1, 2 * math.ceil(3 * math.log2(max(cohort, 2))))


def neighbours(cohort: list[str], degree: int | None, seed: str) -> dict[str, list[str]]:
    """Neighbour lists of a `degree`-regular Harary graph over the cohort ordered by `seed`, or the full
    graph for degree None or degree >= n - 1. Symmetric: j is a neighbour of i exactly when i is one of j."""
    n = len(cohort)
    if degree is None or degree >= n - 1:
        return {c: [d for d in cohort if d != c] for c in cohort}
    if degree < 2:
        raise ValueError(f"a sparse secure-aggregation graph needs degree >= 2, got {degree}")
    order = sorted(cohort, key=lambda c: hashlib.sha256(f"{seed}|{c}".encode()).digest())
    half = degree // 2
    links: dict[str, set[str]] = {c: set() for c in cohort}
    for pos, c in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            links[c].add(other)
            links[other].add(c)
    return {c: sorted(links[c]) for c in cohort}
