"""Server side of secure aggregation: a `RoundProtocol` that runs the stages through any pool's generic
`exchange`, and sees only masked updates and, after unmasking, their sum.

`collect` runs advertise -> share -> masked (training happens inside the masked stage) and returns each
survivor's masked vector as its `Update`, so the round loop's checks (sender, round, shape) still apply.
`aggregate` runs consistency -> unmask on the updates the loop accepted, removes the masks and returns
the mean. Every reply is checked (tensors present, of the right type and size) before use, and a bad one is
that client's failure; no example count or metric travels in the clear (they are summed inside the masked
vector), and the unmasked sum is checked against what clipped clients can reach. Too few survivors at any stage, or shares that do not
recover a valid key, raise `SecAggAbort`; the round loop then records the round as failed with the reason,
leaves the model as it was, and goes on with the next round.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..messages import Message, as_bytes
from ..params import Layout
from ..server.pool import ClientPool
from ..server.protocol import RoundAborted, RoundProtocol, exchange_stage
from ..server.validate import describe, sum_norm_problem
from ..strategies.base import Strategy
from ..strategies.fedavg import weighted_mean
from ..transforms.base import Transform
from ..types import Config, Failure, State, Update
from . import keys, prg, shamir
from .client import distributed_noise_std, holders_of
from .graph import default_degree
from .protocol import (ADVERTISE, CONSISTENCY, IDENTITY_KEYS, MASKED, SHARE, UNMASK, RoundPlan, SecAggConfig,
                       threshold_count)

SIGNATURE_BYTES = 64  # Ed25519


class SecAggAbort(RoundAborted):
    """Secure aggregation could not finish safely; nothing was revealed beyond what the protocol allows and
    the global model is unchanged."""


@dataclass
class _Round:
    """What the server keeps between the stages of one round."""

    plan: RoundPlan
    dim: int
    clip: float | None  # the L2 clip norm the clients were told (central DP), for the influence check
    adverts: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # cid -> (c_pk, s_pk)
    sharers: set[str] = field(default_factory=set)
    masked: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rnd(self) -> int:
        return self.plan.round

    @property
    def threshold(self) -> int:
        return self.plan.threshold

    def holders(self, cid: str) -> list[str]:
        return holders_of(cid, [j for j in self.plan.neighbours(cid) if j in self.adverts])


def refuse_strategy(strategy: Strategy, what: str) -> None:
    """Raise `ValueError` unless `strategy` aggregates with the weighted mean, the only aggregator that can
    run on a sum (`what` names the feature that needs it)."""
    if strategy.aggregator is not weighted_mean:
        name = getattr(strategy.aggregator, "__name__", type(strategy.aggregator).__name__)
        raise ValueError(
            f"{what} cannot be combined with the {name} aggregator: {what} gives the server only the sum of the "
            "clients' updates, and robust aggregators need each update on its own (to rank, trim or compare them). "
            "Use the weighted mean, and bound each client's influence with client-side clipping (--dp-clip, or "
            "the secure-aggregation clip range) instead."
        )


def refuse_extras(strategy: Strategy, what: str) -> None:
    """Raise `ValueError` if `strategy`'s clients upload `extras` besides the delta: `what` (a privacy
    feature) clips, noises or masks only the delta, so the extras would leave each client unprotected."""
    if strategy.client_extras:
        raise ValueError(
            f"{what} cannot be combined with the {strategy.name} strategy: its clients also upload "
            f"{', '.join(strategy.client_extras)} with every update, and {what} protects only the model delta, so "
            "those vectors would reach the server clipped, noised and masked by nothing. Use a strategy whose "
            "clients send only the delta (fedavg, fedprox, fedadam, ...)."
        )


class SecAggProtocol(RoundProtocol):
    """Secure aggregation over any pool. `registry` is the clients' identity public keys (the PKI);
    `seed` makes the public neighbour graph reproducible; `noise` > 0 turns on distributed DP (each client
    adds its share of Gaussian noise of multiplier `noise`, see `distributed_noise_std`). The aggregate is
    the unweighted mean of the survivors' clipped, quantised updates (example counts would leak into the sum's
    scale). The summed metrics' cohort means are written into every survivor's update (`metrics`) after
    unmasking, and their sums kept in `last_metrics`: the server never sees one client's metrics."""

    name = "secagg"

    def __init__(self, config: SecAggConfig, registry: Mapping[str, bytes], seed: int = 0, noise: float = 0.0) -> None:
        if not (np.isfinite(noise) and noise >= 0):
            raise ValueError(f"distributed DP noise multiplier must be >= 0, got {noise}")
        self.config, self.registry, self.seed, self.noise = config, registry, seed, noise
        self.last_sum: np.ndarray | None = None
        self.last_metrics: dict[str, float] = {}
        self._round: _Round | None = None

    def check(self, strategy: Strategy) -> None:
        refuse_strategy(strategy, "secure aggregation")
        refuse_extras(strategy, "secure aggregation")

    def plan(self, rnd: int, cohort: list[str]) -> RoundPlan:
        """The round plan every client of `cohort` gets."""
        n = len(cohort)
        degree = None if self.config.graph == "full" else (self.config.degree or default_degree(n))
        degree = None if degree is None or degree >= n - 1 else degree
        holders = n if degree is None else degree + 1
        quantizer = self.config.quantizer(n)
        return RoundPlan(rnd, tuple(sorted(cohort)), degree, f"{self.seed}/{rnd}",
                         threshold_count(self.config.threshold, holders), threshold_count(self.config.threshold, n),
                         quantizer.clip_range, quantizer.levels, self.config.fields, self.noise)

    def collect(
        self, pool: ClientPool, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform]
    ) -> list[Update | Failure]:
        if not instructions:
            return []
        cohort = sorted(instructions)
        rnd = int(next(iter(instructions.values()))["round"])
        plan = self.plan(rnd, cohort)
        from ..privacy.central import CLIP_KEY  # the privacy package builds secure aggregation: import late

        clip = next(iter(instructions.values())).get(CLIP_KEY)
        rs = self._round = _Round(plan, Layout.of(state).size, float(clip) if clip is not None else None)
        if self.noise > 0 and rs.clip is None:
            raise ValueError("distributed DP needs the clients' L2 clip norm: run it with central DP's clipping (dp_clip)")
        digest = plan.digest()
        failures: list[Failure] = []

        meta = self.plan_meta(plan)
        replies = self._stage(pool, ADVERTISE, {c: Message(ADVERTISE, meta=meta) for c in cohort}, failures)
        for cid, reply in replies.items():
            problem = _bytes_problem(reply, {"c_pk": keys.KEY_BYTES, "s_pk": keys.KEY_BYTES,
                                             "signature": SIGNATURE_BYTES})
            if problem is not None:
                failures.append(Failure(cid, "rejected", f"{ADVERTISE}: {problem}"))
                continue
            c_pk, s_pk = as_bytes(reply.tensors["c_pk"]), as_bytes(reply.tensors["s_pk"])
            if self._signed(cid, reply, keys.advertisement(digest, cid, c_pk, s_pk), failures):
                rs.adverts[cid] = (c_pk, s_pk)
        _require(rs, len(rs.adverts), ADVERTISE)

        requests = {}
        for cid in rs.adverts:
            tensors = {}
            for j in plan.neighbours(cid):
                if j in rs.adverts:
                    tensors[f"c_pk/{j}"] = replies[j].tensors["c_pk"]
                    tensors[f"s_pk/{j}"] = replies[j].tensors["s_pk"]
                    tensors[f"sig/{j}"] = replies[j].tensors["signature"]
            requests[cid] = Message(SHARE, tensors, {"round": rnd})
        shared = self._stage(pool, SHARE, requests, failures)
        rs.sharers = set(shared)
        _require(rs, len(rs.sharers), SHARE)

        inbox: dict[str, dict[str, np.ndarray]] = {c: {} for c in rs.sharers}
        for sender, reply in shared.items():
            for name, blob in reply.tensors.items():
                recipient = name[len("to/"):]
                if name.startswith("to/") and recipient in inbox and recipient in plan.neighbours(sender):
                    inbox[recipient][f"from/{sender}"] = blob
        requests = {c: Message(MASKED, inbox[c], {"round": rnd, "sharers": sorted(rs.sharers), "config": instructions[c]})
                    for c in sorted(rs.sharers)}
        answers = self._stage(pool, MASKED, requests, failures, state=state, transforms=transforms,
                              deadline=self.config.train_deadline)
        updates: list[Update | Failure] = []
        size = rs.dim + len(plan.fields)
        for cid, reply in answers.items():
            problem = _masked_problem(reply, size, rnd)
            if problem is not None:
                failures.append(Failure(cid, "rejected", f"{MASKED}: {problem}"))
                continue
            y, meta = reply.tensors["masked"], reply.meta
            rs.masked[cid] = y
            # the round loop checks sender, round and shape on the masked delta; metrics travel inside `y`
            updates.append(Update(cid, rnd, y[: rs.dim].astype(np.float64), 1, {}, meta.get("partial", False)))
        return updates + failures

    def aggregate(self, pool: ClientPool, strategy: Strategy, updates: list[Update], rnd: int) -> np.ndarray:
        rs = self._round
        if rs is None or rs.rnd != rnd:
            raise SecAggAbort(f"round {rnd}: no secure-aggregation state for this round")
        self._round = None
        plan = rs.plan
        survivors = sorted(u.client_id for u in updates if u.client_id in rs.masked)
        _require(rs, len(survivors), MASKED, plan.quorum)
        for cid in survivors:
            live = [j for j in rs.holders(cid) if j in survivors]
            if len(live) < rs.threshold:
                raise SecAggAbort(f"round {rnd}: only {len(live)} of client {cid}'s share holders survived, fewer than "
                                  f"the threshold {rs.threshold}; aborting before any mask is revealed. "
                                  "The global model is unchanged.")
        base = {"round": rnd, "survivors": survivors}
        failures: list[Failure] = []
        statement = keys.consistency_statement(plan.digest(), rs.sharers, survivors)
        confirmed = self._stage(pool, CONSISTENCY, {c: Message(CONSISTENCY, meta=base) for c in survivors}, failures)
        signatures = {f"sig/{cid}": reply.tensors["signature"] for cid, reply in confirmed.items()
                      if self._signed(cid, reply, statement, failures)}
        _require(rs, len(signatures), CONSISTENCY, plan.quorum)
        revealed = self._stage(pool, UNMASK, {c: Message(UNMASK, dict(signatures), base) for c in survivors}, failures)
        total = self._unmask(rs, survivors, revealed)
        self.last_sum, self.last_metrics = self._decode(rs, total, len(survivors))
        means = {name: value / len(survivors) for name, value in self.last_metrics.items()}
        for u in updates:
            if u.client_id in rs.masked:
                u.metrics = dict(means)
        return self.last_sum / len(survivors)

    def _decode(self, rs: _Round, total: np.ndarray, count: int) -> tuple[np.ndarray, dict[str, float]]:
        """The float sum and the summed metrics, after the influence checks: every coordinate of the integer sum
        must be one that `count` in-range inputs can reach, and with central-DP clipping the sum's L2 norm at
        most `count` clipped updates plus rounding (and the distributed noise). Raise `SecAggAbort` otherwise:
        some client sent values outside the plan, and its update would move the model more than clipping allows."""
        plan = rs.plan
        top = count * (plan.levels - 1)
        if int(total.max()) > top:
            bad = int(np.count_nonzero(total > top))
            raise SecAggAbort(f"round {rs.rnd}: {bad} coordinates of the unmasked sum lie outside what {count} clients "
                              "can send within the clip range: a client sent an out-of-range (unclipped or forged) "
                              "input; the round is refused and the global model is unchanged.")
        quantizer = plan.quantizer()
        delta_sum = quantizer.decode_sum(total[: rs.dim], count)
        if rs.clip is not None:
            slack = count * quantizer.max_rounding_norm(rs.dim)
            if plan.noise > 0:
                slack += distributed_noise_std(plan, rs.clip, rs.dim) * math.sqrt(count) * (math.sqrt(rs.dim) + 8)
            problem = sum_norm_problem(delta_sum, count, rs.clip, slack)
            if problem is not None:
                raise SecAggAbort(f"round {rs.rnd}: {problem}; the round is refused and the global model is unchanged.")
        sums = {name: float(q.decode_sum(total[rs.dim + i: rs.dim + i + 1], count)[0] + count * centre)
                for i, ((name, _, _), (q, centre)) in enumerate(zip(plan.fields, plan.field_quantizers()))}
        return delta_sum, sums

    def _unmask(self, rs: _Round, survivors: list[str], revealed: Mapping[str, Message]) -> np.ndarray:
        """Sum of the survivors' quantised updates: their masked vectors minus self masks and the pairwise
        masks they share with clients that dropped after sharing keys."""
        dim = rs.masked[survivors[0]].size
        total = np.zeros(dim, dtype=np.uint32)
        for cid in survivors:
            total += rs.masked[cid]
        for cid in survivors:
            total -= prg.expand(self._recover(rs, cid, "b", revealed), dim)
        alive = set(survivors)
        for gone in sorted(rs.sharers - alive):
            s_sk = keys.load_private(self._recover(rs, gone, "s", revealed))
            if keys.public_bytes(s_sk) != rs.adverts[gone][1]:
                raise SecAggAbort(f"round {rs.rnd}: the recovered mask key of {gone} does not match its advertised key "
                                  "(corrupted shares); the global model is unchanged.")
            for peer in rs.plan.neighbours(gone):
                if peer in alive:  # peer added sign(peer, gone) * mask; take it back out
                    mask = prg.expand(keys.agree(s_sk, rs.adverts[peer][1], keys.pair_info("mask", rs.rnd, peer, gone)), dim)
                    total = total - mask if peer < gone else total + mask
        return total

    def _recover(self, rs: _Round, owner: str, kind: str, revealed: Mapping[str, Message]) -> bytes:
        holders = rs.holders(owner)
        shares = {x: as_bytes(revealed[j].tensors[f"{kind}/{owner}"])
                  for x, j in enumerate(holders, start=1) if j in revealed and f"{kind}/{owner}" in revealed[j].tensors}
        if len(shares) < rs.threshold:
            what = "self-mask seed" if kind == "b" else "mask key"
            raise SecAggAbort(f"round {rs.rnd}: only {len(shares)} shares of the {what} of {owner} came back, fewer "
                              f"than the threshold {rs.threshold}; the sum cannot be unmasked. The global model is unchanged.")
        try:
            secret = shamir.combine(shares, rs.threshold)
        except shamir.ShamirError as exc:
            secret, problem = b"", str(exc)
        else:
            problem = f"they recover {len(secret)} bytes, not a {keys.KEY_BYTES}-byte key"
        if len(secret) != keys.KEY_BYTES:  # both secrets, mask key and self-mask seed, are 32 bytes
            raise SecAggAbort(f"round {rs.rnd}: shares of {owner} are corrupt ({problem}); the global model is "
                              "unchanged.")
        return secret

    def _stage(
        self, pool: ClientPool, stage: str, requests: dict[str, Message], failures: list[Failure], *,
        state: State | None = None, transforms: Sequence[Transform] = (), deadline: float | None = None,
    ) -> dict[str, Message]:
        return exchange_stage(pool, stage, requests, failures, deadline=deadline or self.config.deadline,
                              state=state, transforms=transforms)

    def plan_meta(self, plan: RoundPlan) -> dict:
        """The plan, plus the identity public keys (hex) of the whole cohort, whose consistency signatures every
        client checks, for clients that take the registry from the server (a deployment's client processes)."""
        return {**plan.to_meta(), IDENTITY_KEYS: {j: self.registry[j].hex() for j in plan.cohort if j in self.registry}}

    def _signed(self, cid: str, reply: Message, statement: bytes, failures: list[Failure]) -> bool:
        """Whether `reply` carries `cid`'s valid identity signature on `statement`; a forgery is a failure."""
        try:
            keys.verify(self.registry, cid, as_bytes(reply.tensors["signature"]), statement)
            return True
        except (keys.SecAggKeyError, KeyError) as exc:
            failures.append(Failure(cid, "rejected", f"bad signature: {exc}"))
            return False


def _bytes_problem(reply: Message, lengths: Mapping[str, int]) -> str | None:
    """Why `reply` lacks one of the byte strings named in `lengths` (as 1-D uint8 tensors of those sizes)."""
    for name, length in lengths.items():
        value = reply.tensors.get(name)
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.shape != (length,):
            got = "nothing" if value is None else f"{value.dtype} {value.shape}"
            return f"{name!r} must be {length} bytes (a 1-D uint8 tensor), got {got}"
    return None


def _masked_problem(reply: Message, size: int, rnd: int) -> str | None:
    """Why a masked-stage reply cannot stand for its client's update this round, or None. Nothing else about
    the client travels in the clear: its example count and metrics are inside the masked vector."""
    y, meta = reply.tensors.get("masked"), reply.meta
    if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.shape != (size,):
        got = "nothing" if y is None else f"{y.dtype} {y.shape}"
        return f"masked update must be a uint32 vector of shape ({size},), got {got}"
    if meta.get("round") != rnd or isinstance(meta.get("round"), bool):
        return f"reply is for round {describe(meta.get('round'))}, this is round {rnd}"
    if not isinstance(meta.get("partial", False), bool):
        return f"partial must be true or false, got {describe(meta.get('partial'))}"
    return None


def _require(rs: _Round, count: int, stage: str, needed: int | None = None) -> None:
    needed = rs.threshold if needed is None else needed
    if count < needed:
        raise SecAggAbort(f"round {rs.rnd}: only {count} clients completed {stage}, fewer than the {needed} secure "
                          "aggregation needs (threshold, or a majority of the cohort to confirm the survivors); "
                          "the round is aborted and the global model is unchanged.")
