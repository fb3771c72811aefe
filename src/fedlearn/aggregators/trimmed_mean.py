"""Coordinate-wise trimmed mean (Yin et al. 2018)."""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_stack


class TrimmedMean:
    """Per coordinate, drop the floor(beta * n) largest and smallest values and average the rest.

    Tolerates f <= floor(beta * n) Byzantine clients per round (each extreme they send is trimmed);
    beta must be in [0, 0.5) so that something is left to average. Example weights are ignored.
    """

    name = "trimmed_mean"
    streams = False  # needs every update of the round at once: the round loop keeps the stack
    min_updates = 1

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed mean beta is the fraction cut from each end and must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def __call__(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_stack(deltas, weights)
        n = deltas.shape[0]
        k = math.floor(self.beta * n)
        return np.sort(deltas, axis=0)[k : n - k].mean(axis=0)
