"""Contribution scores of one round's players from a utility of coalitions (Shapley 1953).

`Utility` evaluates a coalition (a set of player indices) once and caches it, so every method below counts
the validation evaluations it really paid for. Exact Shapley needs all 2^n coalitions; leave-one-out n + 1;
GTG-Shapley (Liu et al., "GTG-Shapley: Efficient and Accurate Participant Contribution Evaluation in
Federated Learning", ACM TIST 2022) samples permutations, each guided to start with a different player, and
saves evaluations three ways: a round whose full coalition barely beats the empty one scores zero for all
(between-round truncation); a permutation stops evaluating once its prefix is within `truncation` of the
full coalition (the rest add ~0, within-round truncation); and sampling stops once the estimate has
converged (standard error of every player's value within `tolerance` of the round's gain, checked after
each cycle in which every player led a permutation) or at `max_permutations`.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np


class Utility:
    """`fn(coalition) -> float` with a cache keyed by the coalition; `evaluations` counts cache misses."""

    def __init__(self, fn: Callable[[frozenset[int]], float]) -> None:
        self._fn, self._cache = fn, {}
        self.evaluations = 0

    def __call__(self, coalition: frozenset[int]) -> float:
        if coalition not in self._cache:
            self._cache[coalition] = float(self._fn(coalition))
            self.evaluations += 1
        return self._cache[coalition]


def exact_shapley(n: int, utility: Utility) -> np.ndarray:
    """phi_i = sum over S not containing i of |S|! (n-|S|-1)! / n! (v(S + i) - v(S))."""
    phi = np.zeros(n)
    weights = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for k in range(n):
            for subset in itertools.combinations(others, k):
                s = frozenset(subset)
                phi[i] += weights[k] * (utility(s | {i}) - utility(s))
    return phi


def leave_one_out(n: int, utility: Utility) -> np.ndarray:
    """v(N) - v(N without i): what the round would lose without each player."""
    full = frozenset(range(n))
    return np.array([utility(full) - utility(full - {i}) for i in range(n)])


def gtg_shapley(n: int, utility: Utility, *, truncation: float = 1e-3, tolerance: float = 0.03,
                max_permutations: int | None = None, seed: int = 0) -> np.ndarray:
    """GTG-Shapley estimate of the Shapley values (see the module docstring for the three savings).

    Sampling stops after a full cycle of permutations once every player's standard error of the mean
    marginal contribution is at most `tolerance` times the round's total gain |v(N) - v(empty)|."""
    full, empty = frozenset(range(n)), frozenset()
    v_full, v_empty = utility(full), utility(empty)
    if n == 0 or abs(v_full - v_empty) <= truncation:
        return np.zeros(n)
    max_permutations = max_permutations or max(50, 10 * n)
    rng = np.random.default_rng(seed)
    phi, spread, order = np.zeros(n), np.zeros(n), []  # running mean and sum of squared deviations (Welford)
    for t in range(max_permutations):
        if t % 2 == 0:
            lead = (t // 2) % n
            order = [lead, *(j for j in rng.permutation(n) if j != lead)]
        else:  # antithetic: the reverse of the last permutation, which cancels much of its sampling error
            order = order[::-1]
        prefix, previous = empty, v_empty
        for i in order:
            if abs(v_full - previous) <= truncation:
                gain = 0.0
            else:
                prefix = prefix | {i}
                value = utility(prefix)
                gain, previous = value - previous, value
            step = gain - phi[i]
            phi[i] += step / (t + 1)
            spread[i] += step * (gain - phi[i])
        done = t + 1
        if done % (2 * n) == 0 and np.sqrt(spread / (done * (done - 1))).max() <= tolerance * abs(v_full - v_empty):
            break
    return phi
