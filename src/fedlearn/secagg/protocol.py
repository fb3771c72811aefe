"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020): the stages, the settings, and
the per-round plan the server sends every client.

Stages, each one message kind with a client-side handler (`client.py`) and a server-side step (`server.py`):

1. ``secagg/advertise``   clients send two fresh X25519 public keys, signed with their identity key.
2. ``secagg/share``       clients verify neighbours' signatures, Shamir-share their mask-key and self-mask
                          seed among their neighbours, and send the shares encrypted to each neighbour.
3. ``secagg/masked``      clients train, clip and quantise the update into Z_{2^32}, and add the self mask
                          and pairwise masks (which cancel in the sum).
4. ``secagg/consistency`` clients sign the survivor set the server announced, so the server cannot show
                          different clients different survivor sets (optional, on by default).
5. ``secagg/unmask``      clients reveal, for each neighbour, the self-mask share of a survivor or the
                          mask-key share of a dropout, never both; the server removes the masks from the sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .quantize import Quantizer, max_levels

ADVERTISE = "secagg/advertise"
SHARE = "secagg/share"
MASKED = "secagg/masked"
CONSISTENCY = "secagg/consistency"
UNMASK = "secagg/unmask"
STAGES = (ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK)
IDENTITY_KEYS = "identity_keys"  # advertise meta: client id -> Ed25519 public key (hex) of it and its neighbours
GRAPHS = ("sparse", "full")


class SecAggError(RuntimeError):
    """A client refused to go on: a forged signature, an unsafe plan, or a message out of order."""


def threshold_count(fraction: float, holders: int) -> int:
    """Shares needed to recover a secret shared among `holders`: more than `fraction` of them."""
    return min(holders, math.floor(fraction * holders) + 1)


@dataclass(frozen=True)
class SecAggConfig:
    """Settings of secure aggregation.

    `clip_range`: every coordinate of an update is clipped to [-clip_range, clip_range] before quantisation.
    `graph`: "sparse" (SecAgg+, `degree` neighbours each; default about 6 log2 n) or "full".
    `threshold`: fraction of a client's share holders (its neighbours and itself) needed to recover its
    secrets; at least one half, so that a majority must cooperate.
    `deadline` / `train_deadline`: seconds a client may take to answer a key stage / the training stage.
    """

    clip_range: float = 1.0
    graph: str = "sparse"
    degree: int | None = None
    threshold: float = 0.5
    consistency_check: bool = True
    deadline: float = 30.0
    train_deadline: float = 600.0

    def __post_init__(self) -> None:
        Quantizer(self.clip_range, 2)  # validates the range
        if self.graph not in GRAPHS:
            raise ValueError(f"secure-aggregation graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        if self.degree is not None and self.degree < 2:
            raise ValueError(f"secure-aggregation degree must be >= 2, got {self.degree}")
        if not 0.5 <= self.threshold < 1:
            raise ValueError(f"secure-aggregation threshold must be in [0.5, 1), got {self.threshold}")
        if self.deadline <= 0 or self.train_deadline <= 0:
            raise ValueError("secure-aggregation deadlines must be positive")

    def quantizer(self, cohort: int) -> Quantizer:
        """The finest quantiser whose cohort-wide sum cannot wrap the ring."""
        return Quantizer(self.clip_range, max_levels(cohort))


@dataclass(frozen=True)
class RoundPlan:
    """What the server tells one client at the start of a round; the client checks it is safe."""

    round: int
    cohort_size: int
    neighbours: tuple[str, ...]
    threshold: int
    clip_range: float
    levels: int
    consistency_check: bool

    def to_meta(self) -> dict[str, Any]:
        return {"round": self.round, "cohort_size": self.cohort_size, "neighbours": list(self.neighbours),
                "threshold": self.threshold, "clip_range": self.clip_range, "levels": self.levels,
                "consistency_check": self.consistency_check}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], cid: str) -> "RoundPlan":
        """Parse and validate a plan; raise `SecAggError` if it is malformed or unsafe for client `cid`."""
        try:
            plan = cls(int(meta["round"]), int(meta["cohort_size"]), tuple(str(c) for c in meta["neighbours"]),
                       int(meta["threshold"]), float(meta["clip_range"]), int(meta["levels"]),
                       bool(meta["consistency_check"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"malformed secure-aggregation plan: {exc}") from None
        holders = len(plan.neighbours) + 1
        if cid in plan.neighbours or len(set(plan.neighbours)) != len(plan.neighbours):
            raise SecAggError("plan lists this client as its own neighbour or repeats a neighbour")
        if plan.threshold < 2:
            raise SecAggError("threshold below 2: the server could unmask this client's update on its own")
        if not holders / 2 < plan.threshold <= holders:
            raise SecAggError(f"unsafe threshold {plan.threshold} for {holders} share holders: "
                              "it must be a majority and at most the number of holders")
        try:
            plan.quantizer().check_cohort(plan.cohort_size)
        except ValueError as exc:
            raise SecAggError(f"unsafe quantisation plan: {exc}") from None
        return plan

    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip_range, self.levels)
