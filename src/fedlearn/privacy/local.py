"""Local DP: each client clips its update and adds Gaussian noise before it leaves the device, so the
server (and anyone on the wire) only ever sees a noised update. Each client's epsilon grows with the
number of updates it has released; the client counts them itself and reports its epsilon with each update.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

from ..transforms.base import Transform
from ..types import Config, Failure, Metrics, Update
from .accountant import gaussian_epsilon
from .clipping import clip_l2

EPSILON_KEY = "ldp_epsilon"


class LocalDP(Transform):
    """Clip to L2 norm `clip`, add N(0, (noise_multiplier * clip)^2) per coordinate on the client.

    Privacy per client: `releases` Gaussian mechanisms of multiplier `noise_multiplier` (no amplification:
    the client knows it took part), epsilon at `delta` by RDP. The server half records every client's
    latest epsilon; `report` gives the largest."""

    name = "local_dp"
    per_update = True

    def __init__(self, clip: float, noise_multiplier: float, delta: float, rng: np.random.Generator | None = None) -> None:
        if not (math.isfinite(clip) and clip > 0) or noise_multiplier <= 0:
            raise ValueError(f"local DP needs a positive clip norm and noise multiplier, got {clip} and {noise_multiplier}")
        self.clip, self.noise_multiplier, self.delta = clip, noise_multiplier, delta
        self.rng = rng or np.random.default_rng()
        self.releases: Counter[str] = Counter()  # kept by each client about itself
        self.client_epsilons: dict[str, float] = {}  # what the server learned from the reports

    def client(self, update: Update, config: Config) -> Update:
        clipped, _ = clip_l2(update.delta, self.clip)
        noised = clipped + self.rng.normal(0.0, self.noise_multiplier * self.clip, size=clipped.shape)
        self.releases[update.client_id] += 1
        eps = gaussian_epsilon(self.noise_multiplier, self.releases[update.client_id], self.delta)
        return dataclasses.replace(update, delta=noised, metrics={**update.metrics, EPSILON_KEY: eps})

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        for u in updates:
            if EPSILON_KEY in u.metrics:
                self.client_epsilons[u.client_id] = float(u.metrics[EPSILON_KEY])
        return updates, []

    def report(self, rnd: int) -> Metrics:
        return {"ldp_epsilon_max": max(self.client_epsilons.values())} if self.client_epsilons else {}
