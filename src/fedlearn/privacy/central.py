"""Client-level central DP (DP-FedAvg, McMahan et al. 2018) as a `Transform`.

Client half: clip the update to L2 norm C (C comes from the server each round, so adaptive clipping works
over any pool). Server half: refuse any update above C (a client that skipped clipping would void the
guarantee; off under secure aggregation, where updates are masked), refuse an unclipped indicator other
than 0 or 1 with adaptive clipping (so one client moves the clip norm no more than the protocol allows), and
weight every client equally.
Finalize half: add Gaussian noise of std z*C to the sum and divide by the expected cohort size (the
fixed-denominator estimator), account the round, and stop the run before a round that would exceed the
epsilon budget.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ..transforms.base import StopRun, Transform
from ..types import Config, Failure, Metrics, Update
from .accountant import SampledGaussian
from .clipping import AdaptiveClipping, clip_l2

log = logging.getLogger(__name__)

CLIP_KEY = "dp_clip"
UNCLIPPED_KEY = "dp_unclipped"
TRANSPORT_SLACK = 1e-6  # relative: float32 transport of a delta clipped to C raises its norm by at most ~1e-7


class PrivacyBudgetExhausted(StopRun):
    """The next round would take epsilon above the configured budget."""


def clip_to_server_norm(update: Update, config: Config) -> Update:
    """The client half of central DP: clip to the norm the server sent this round, and record whether the
    update was already within it (what adaptive clipping counts)."""
    if CLIP_KEY not in config:
        raise ValueError("central DP is on but the server sent no clip norm (config key 'dp_clip')")
    clipped, within = clip_l2(update.delta, float(config[CLIP_KEY]))
    return dataclasses.replace(update, delta=clipped, metrics={**update.metrics, UNCLIPPED_KEY: float(within)})


class CentralDPClient(Transform):
    """The client half of `CentralDP` alone, for a client process of a deployment whose server runs central
    DP (`fedlearn client --central-dp`): the clip norm comes with each task, the noise is added by the server.
    It has the server transform's name, so the server can check each client declared it."""

    name = "central_dp"
    stateful_client = False  # the client half only clips to the norm the task carries

    def client(self, update: Update, config: Config) -> Update:
        return clip_to_server_norm(update, config)


class CentralDP(Transform):
    """DP-FedAvg. `mechanism` describes sampling and the total noise multiplier z used for accounting;
    `delta` is the accounting delta; `budget` the largest epsilon the run may reach (None: no limit).
    `rounding_slack(d)` widens the sensitivity when updates are quantised after clipping (secure aggregation).
    `rng` draws the noise; leave it None in real use (OS entropy): a seeded generator makes noise guessable.
    `distributed`: the clients already added the noise inside secure aggregation (`SecAggProtocol(noise=z)`),
    calibrated so that the sum carries at least std z * sensitivity; finalize then adds none, and accounts
    for that worst case."""

    name = "central_dp"
    stateful_client = False  # the client half only clips to the norm the task carries
    per_update = True

    def __init__(
        self,
        clip: float,
        mechanism: SampledGaussian,
        delta: float,
        *,
        budget: float | None = None,
        adaptive: AdaptiveClipping | None = None,
        verify_clipping: bool = True,
        rounding_step: float = 0.0,
        rng: np.random.Generator | None = None,
        distributed: bool = False,
    ) -> None:
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"DP clip norm must be a positive number, got {clip}")
        if not 0 < delta < 1:
            raise ValueError(f"DP delta must be in (0, 1), got {delta}")
        self.clip, self.mechanism, self.delta, self.budget = clip, mechanism, delta, budget
        self.adaptive, self.verify_clipping, self.rounding_step = adaptive, verify_clipping, rounding_step
        if distributed and adaptive is not None:
            raise ValueError("distributed DP needs a fixed clip norm: adaptive clipping's count noise would be "
                             "added by the server")
        self.distributed = distributed
        self.expected = float(mechanism.cohort)
        z = mechanism.noise_multiplier
        self.update_noise = adaptive.update_noise_multiplier(z, self.expected) if adaptive and z > 0 else z
        self.rng = rng or np.random.default_rng()
        self.rounds_spent = 0
        self.last_noise_std = 0.0
        self._clip_used = clip

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at `delta` after `rounds` noised rounds (default: the rounds spent so far)."""
        return self.mechanism.epsilon(self.rounds_spent if rounds is None else rounds, self.delta)

    # round-level hooks
    def configure(self, rnd: int) -> Config:
        if self.budget is not None and self.epsilon(self.rounds_spent + 1) > self.budget:
            raise PrivacyBudgetExhausted(
                f"round {rnd} would raise epsilon to {self.epsilon(self.rounds_spent + 1):.3f} at delta {self.delta:g}, "
                f"above the budget {self.budget:g}; {self.rounds_spent} rounds spent epsilon {self.epsilon():.3f}")
        return {CLIP_KEY: self.clip}

    def report(self, rnd: int) -> Metrics:
        metrics = {"dp_epsilon": self.epsilon(), "dp_clip": self._clip_used, "dp_noise_std": self.last_noise_std,
                   "dp_rounds": float(self.rounds_spent)}
        if self.adaptive is not None:
            metrics["dp_clip_next"] = self.clip
        return metrics

    def restore(self, rounds: list) -> None:
        noised = [r for r in rounds if "dp_rounds" in r.metrics]
        if noised:
            last = noised[-1].metrics
            self.rounds_spent = int(last["dp_rounds"])
            self.clip = float(last.get("dp_clip_next", self.clip))

    # the three halves
    def client(self, update: Update, config: Config) -> Update:
        return clip_to_server_norm(update, config)

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        kept, refused = [], []
        for u in updates:
            norm = float(np.linalg.norm(u.delta))
            unclipped = u.metrics.get(UNCLIPPED_KEY)
            if self.verify_clipping and norm > self.clip * (1 + TRANSPORT_SLACK):
                refused.append(Failure(u.client_id, "rejected", f"update norm {norm:.4g} exceeds the DP clip norm "
                                       f"{self.clip:.4g}: the client did not clip"))
            elif self.adaptive is not None and unclipped not in (0.0, 1.0):
                # the count of unclipped updates drives the clip norm: each client adds at most 1 (Andrew et al.)
                refused.append(Failure(u.client_id, "rejected", f"metric {UNCLIPPED_KEY!r} must be 0 or 1 (whether "
                                       f"the update was within the clip norm), got {unclipped!r}"))
            else:
                # rounding on the way (a clipped float64 delta sent in float32) can leave it a hair outside the
                # ball; project it back, so the sensitivity stays exactly C
                delta = u.delta * (self.clip / norm) if self.verify_clipping and norm > self.clip else u.delta
                kept.append(dataclasses.replace(u, delta=delta, num_examples=1))
        return kept, refused

    def finalize(self, delta: np.ndarray, updates: list[Update], rnd: int) -> np.ndarray:
        total = delta * len(updates)  # the (equal-weight) mean back to a sum
        sensitivity = self.clip + self.rounding_step * math.sqrt(delta.size)
        std = self.update_noise * sensitivity
        noise = 0.0 if self.distributed else self.rng.normal(0.0, std, size=delta.shape)
        noised = (total + noise) / self.expected
        self.last_noise_std = std / self.expected
        self._clip_used = self.clip
        if self.adaptive is not None:
            unclipped = sum(u.metrics.get(UNCLIPPED_KEY, 0.0) for u in updates)
            self.clip = self.adaptive.next_clip(self.clip, unclipped, self.expected, self.rng)
        self.rounds_spent += 1
        log.info("round %d: DP epsilon %.3f at delta %g", rnd, self.epsilon(), self.delta)
        return noised
