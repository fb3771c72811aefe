"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020): the stages, the settings, and
the round plan the server sends every client.

Stages, each one message kind with a client-side handler (`client.py`) and a server-side step (`server.py`):

1. ``secagg/advertise``   clients check the plan, send two fresh X25519 public keys, signed with their identity
                          key together with the plan's digest (so clients shown different plans never pair up).
2. ``secagg/share``       clients verify neighbours' signatures, Shamir-share their mask-key and self-mask
                          seed among their neighbours, and send the shares encrypted to each neighbour.
3. ``secagg/masked``      clients train, clip and quantise the update into Z_{2^32}, append the metrics the
                          server may learn the sum of, and add the self mask and pairwise masks (which cancel).
4. ``secagg/consistency`` clients sign (plan, sharer set, survivor set) as they were shown them.
5. ``secagg/unmask``      clients check at least `quorum` (a majority of the cohort) valid signatures on
                          exactly their own view, then reveal for each neighbour the self-mask share of a
                          survivor or the mask-key share of a dropout, never both; the server unmasks the sum.

Two disjoint groups of clients can never both gather a majority of the cohort, and every honest client signs
one statement per round, so a server cannot show some clients a neighbour as alive and others the same
neighbour as dropped (the split-view attack) without the clients refusing to unmask.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .graph import neighbours
from .quantize import Quantizer, max_levels

ADVERTISE = "secagg/advertise"
SHARE = "secagg/share"
MASKED = "secagg/masked"
CONSISTENCY = "secagg/consistency"
UNMASK = "secagg/unmask"
STAGES = (ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK)
IDENTITY_KEYS = "identity_keys"  # advertise meta: client id -> Ed25519 public key (hex) of the whole cohort
GRAPHS = ("sparse", "full")
# metrics summed inside the masked vector: (name, low, high); a value is clipped to [low, high], a client that
# does not report one counts as 0. The server learns only the cohort's sum of each.
DEFAULT_FIELDS: tuple[tuple[str, float, float], ...] = (("train_loss", 0.0, 1e4), ("dp_unclipped", 0.0, 1.0))


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
    secrets, and of the cohort that must confirm the survivor set; at least one half, so that a majority
    must cooperate.
    `fields`: metrics summed inside the masked vector (name, low, high).
    `deadline` / `train_deadline`: seconds a client may take to answer a key stage / the training stage.
    """

    clip_range: float = 1.0
    graph: str = "sparse"
    degree: int | None = None
    threshold: float = 0.5
    fields: tuple[tuple[str, float, float], ...] = DEFAULT_FIELDS
    deadline: float = 30.0
    train_deadline: float = 600.0

    def __post_init__(self) -> None:
        Quantizer(self.clip_range, 2)  # validates the range
        if self.graph not in GRAPHS:
            raise ValueError(f"secure-aggregation graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        if self.degree is not None and (self.degree < 2 or self.degree % 2):
            raise ValueError(f"secure-aggregation degree must be an even number >= 2, got {self.degree}")
        if not 0.5 <= self.threshold < 1:
            raise ValueError(f"secure-aggregation threshold must be in [0.5, 1), got {self.threshold}")
        if self.deadline <= 0 or self.train_deadline <= 0:
            raise ValueError("secure-aggregation deadlines must be positive")
        _check_fields(self.fields, ValueError)

    def quantizer(self, cohort: int) -> Quantizer:
        """The finest quantiser whose cohort-wide sum stays in the lower half of the ring: the upper half is
        headroom, so a forged input outside the clip range lands there (and the round is refused) for about
        half of the coordinates it touches instead of wrapping unseen."""
        return Quantizer(self.clip_range, max_levels(2 * cohort))


@dataclass(frozen=True)
class ClientPolicy:
    """What a client insists on, whatever the server's plan says (the server may be malicious).

    `full_graph_only`: refuse SecAgg+ sparse graphs. A server that picks the graph and pretends clients dropped
    can cut the surviving part of a sparse graph into pieces and learn the sum of each piece (a neighbourhood
    of about degree/2 clients), so protection against an actively malicious server is claimed only for the
    full graph. `min_cohort`: refuse rounds with fewer clients (a server could otherwise run a round of one
    honest client among colluders). `min_noise`: the least distributed-DP noise multiplier to accept."""

    full_graph_only: bool = False
    min_cohort: int = 2
    min_noise: float = 0.0


@dataclass(frozen=True)
class RoundPlan:
    """What the server tells every client at the start of a round (the same plan for all); each client checks
    it is safe, derives its neighbours from it, and binds its signatures to its digest."""

    round: int
    cohort: tuple[str, ...]
    degree: int | None
    graph_seed: str
    threshold: int
    quorum: int
    clip_range: float
    levels: int
    fields: tuple[tuple[str, float, float], ...] = ()
    noise: float = 0.0  # distributed DP: the noise multiplier of the sum, shared out among `quorum` clients
    _graph: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_graph", neighbours(list(self.cohort), self.degree, self.graph_seed))

    def neighbours(self, cid: str) -> list[str]:
        return self._graph[cid]

    @property
    def holders(self) -> int:
        """Share holders of each client: its neighbours and itself."""
        return len(self.cohort) if self.degree is None else self.degree + 1

    def to_meta(self) -> dict[str, Any]:
        return {"round": self.round, "cohort": list(self.cohort), "degree": self.degree, "graph_seed": self.graph_seed,
                "threshold": self.threshold, "quorum": self.quorum, "clip_range": self.clip_range,
                "levels": self.levels, "fields": [list(f) for f in self.fields], "noise": self.noise}

    def digest(self) -> bytes:
        """SHA-256 of the plan's canonical JSON: what every signature of the round is bound to."""
        return hashlib.sha256(json.dumps(self.to_meta(), sort_keys=True).encode()).digest()

    @classmethod
    def from_meta(cls, meta: dict[str, Any], cid: str, policy: ClientPolicy = ClientPolicy()) -> "RoundPlan":
        """Parse and validate a plan; raise `SecAggError` if it is malformed or unsafe for client `cid`."""
        try:
            degree = meta["degree"]
            plan = cls(int(meta["round"]), tuple(str(c) for c in meta["cohort"]),
                       None if degree is None else int(degree), str(meta["graph_seed"]), int(meta["threshold"]),
                       int(meta["quorum"]), float(meta["clip_range"]), int(meta["levels"]),
                       tuple((str(n), float(lo), float(hi)) for n, lo, hi in meta["fields"]), float(meta["noise"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"malformed secure-aggregation plan: {exc}") from None
        n = len(plan.cohort)
        if cid not in plan.cohort or len(set(plan.cohort)) != n or list(plan.cohort) != sorted(plan.cohort):
            raise SecAggError("the plan's cohort leaves this client out, repeats a client or is not sorted")
        if n < max(2, policy.min_cohort):
            raise SecAggError(f"cohort of {n} clients is below this client's minimum of {max(2, policy.min_cohort)}")
        if plan.degree is not None:
            if policy.full_graph_only:
                raise SecAggError("this client accepts only the full graph (it does not trust the server), "
                                  f"and the plan uses a sparse graph of degree {plan.degree}")
            if plan.degree < 2 or plan.degree % 2 or plan.degree >= n - 1:
                raise SecAggError(f"sparse graph degree {plan.degree} must be even, >= 2 and < cohort - 1")
        holders = plan.holders
        if plan.threshold < 2:
            raise SecAggError("threshold below 2: the server could unmask this client's update on its own")
        if not holders / 2 < plan.threshold <= holders:
            raise SecAggError(f"unsafe threshold {plan.threshold} for {holders} share holders: "
                              "it must be a majority and at most the number of holders")
        if not n / 2 < plan.quorum <= n:
            raise SecAggError(f"unsafe consistency quorum {plan.quorum} for a cohort of {n}: it must be a majority, "
                              "or two disjoint groups could each confirm a different survivor set")
        if not (math.isfinite(plan.noise) and plan.noise >= policy.min_noise):
            raise SecAggError(f"distributed DP noise multiplier {plan.noise} is below this client's minimum "
                              f"{policy.min_noise}")
        _check_fields(plan.fields, SecAggError)
        try:
            plan.quantizer().check_cohort(n)
        except ValueError as exc:
            raise SecAggError(f"unsafe quantisation plan: {exc}") from None
        return plan

    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip_range, self.levels)

    def field_quantizers(self) -> list[tuple[Quantizer, float]]:
        """(quantiser, centre) of each summed metric: the value minus the centre is quantised like a coordinate."""
        return [(Quantizer((hi - lo) / 2, self.levels), (hi + lo) / 2) for _, lo, hi in self.fields]


def _check_fields(fields: tuple[tuple[str, float, float], ...], error: type[Exception]) -> None:
    names = [f[0] for f in fields]
    if len(set(names)) != len(names) or len(fields) > 64:
        raise error("summed metric fields must have distinct names (at most 64)")
    for name, lo, hi in fields:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise error(f"summed metric {name!r} needs finite bounds low < high, got [{lo}, {hi}]")
