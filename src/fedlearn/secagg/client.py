"""Client side of secure aggregation: one handler per stage, with the round's secrets kept in the client's
session memory. Every handler checks that it follows the previous stage of the same round, so a replayed
or reordered message is refused instead of leaking a second set of shares."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..messages import ClientSession, Handler, Message, as_bytes, from_bytes
from . import keys, prg, shamir
from .protocol import ADVERTISE, CONSISTENCY, MASKED, SHARE, UNMASK, ClientPolicy, RoundPlan, SecAggError

Signer = Callable[[str, bytes], bytes]


def holders_of(cid: str, live_neighbours: list[str]) -> list[str]:
    """A client's share holders in x-coordinate order (x = position + 1): itself and its live neighbours."""
    return sorted({cid, *live_neighbours})


def share_ad(rnd: int, sender: str, recipient: str) -> bytes:
    return f"fedlearn-secagg-share|{rnd}|{sender}|{recipient}".encode()


def pair_mask(s_sk: X25519PrivateKey, peer_pk: bytes, rnd: int, me: str, peer: str, dim: int) -> np.ndarray:
    """The pairwise mask of (me, peer), signed so that the two ends cancel: + for the smaller id."""
    mask = prg.expand(keys.agree(s_sk, peer_pk, keys.pair_info("mask", rnd, me, peer)), dim)
    return mask if me < peer else np.negative(mask)


class SecAggClient:
    """Stage handlers for the clients of one device or one simulation. `sign(cid, bytes)` signs with the
    client's identity key; `registry` holds every client's identity public key (the trusted PKI); `policy`
    is what the client insists on whatever the server's plan says."""

    def __init__(self, sign: Signer, registry: Mapping[str, bytes], policy: ClientPolicy = ClientPolicy()) -> None:
        self.sign, self.registry, self.policy = sign, registry, policy

    def handlers(self) -> dict[str, Handler]:
        return {ADVERTISE: self.advertise, SHARE: self.share, MASKED: self.masked,
                CONSISTENCY: self.consistency, UNMASK: self.unmask}

    def advertise(self, session: ClientSession, message: Message) -> Message:
        plan = RoundPlan.from_meta(message.meta, session.cid, self.policy)
        c_sk, s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        c_pk, s_pk = keys.public_bytes(c_sk), keys.public_bytes(s_sk)
        digest = plan.digest()
        signature = self.sign(session.cid, keys.advertisement(digest, session.cid, c_pk, s_pk))
        session.memory["secagg"] = {"stage": ADVERTISE, "plan": plan, "digest": digest, "c_sk": c_sk, "s_sk": s_sk}
        return Message(ADVERTISE, {"c_pk": from_bytes(c_pk), "s_pk": from_bytes(s_pk), "signature": from_bytes(signature)})

    def share(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, ADVERTISE)
        plan: RoundPlan = st["plan"]
        me, rnd = session.cid, plan.round
        peers: dict[str, tuple[bytes, bytes]] = {}
        for j in plan.neighbours(me):
            if f"c_pk/{j}" not in message.tensors:
                continue
            c_pk, s_pk, signature = (_blob(message, f"{kind}/{j}") for kind in ("c_pk", "s_pk", "sig"))
            keys.verify(self.registry, j, signature, keys.advertisement(st["digest"], j, c_pk, s_pk))
            peers[j] = (c_pk, s_pk)
        holders = holders_of(me, list(peers))
        if len(holders) < plan.threshold:
            raise SecAggError(f"only {len(holders) - 1} neighbours advertised keys; the threshold is {plan.threshold}")
        seed = os.urandom(prg.SEED_BYTES)
        xs = list(range(1, len(holders) + 1))
        s_shares = shamir.split(keys.private_bytes(st["s_sk"]), xs, plan.threshold)
        b_shares = shamir.split(seed, xs, plan.threshold)
        out = {}
        for x, j in zip(xs, holders):
            if j == me:
                st["own"] = (s_shares[x], b_shares[x])
                continue
            key = keys.agree(st["c_sk"], peers[j][0], keys.pair_info("share", rnd, me, j))
            out[f"to/{j}"] = from_bytes(keys.encrypt(key, s_shares[x] + b_shares[x], share_ad(rnd, me, j)))
        st.update(stage=SHARE, peers=peers, seed=seed)
        return Message(SHARE, out)

    def masked(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, SHARE)
        plan: RoundPlan = st["plan"]
        me, rnd = session.cid, plan.round
        sharers = _names(message.meta, "sharers")
        if me not in sharers or not sharers <= set(plan.cohort):
            raise SecAggError("the server's list of clients that shared keys leaves this client out or names "
                              "clients outside the cohort")
        hidden = sorted(j for j in plan.neighbours(me) if j in sharers and j not in st["peers"])
        if hidden:
            raise SecAggError(f"the server says {hidden[0]!r} shared keys but never showed this client its keys")
        live = [j for j in st["peers"] if j in sharers]
        if len(live) + 1 < plan.threshold:
            raise SecAggError(f"only {len(live)} neighbours shared keys; the threshold is {plan.threshold}")
        st["inbox"] = {j: _blob(message, f"from/{j}") for j in live if f"from/{j}" in message.tensors}
        config = message.meta.get("config", {})
        update = session.fit(dict(config) if isinstance(config, dict) else {})
        x = encode_masked_input(plan, update.delta, update.metrics, config, np.random.default_rng())
        y = x + prg.expand(st["seed"], x.size)
        for j in live:
            y += pair_mask(st["s_sk"], st["peers"][j][1], rnd, me, j, x.size)
        st.update(stage=MASKED, sharers=sharers)
        # nothing about this client travels in the clear but the round and whether its work was cut short
        return Message(MASKED, {"masked": y}, {"round": update.round, "partial": bool(update.partial)})

    def consistency(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, MASKED)
        survivors = _survivors(session.cid, st, message)
        statement = keys.consistency_statement(st["digest"], st["sharers"], survivors)
        st.update(stage=CONSISTENCY, survivors=survivors)
        return Message(CONSISTENCY, {"signature": from_bytes(self.sign(session.cid, statement))})

    def unmask(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, None)
        if st["stage"] != CONSISTENCY:
            raise SecAggError(f"{message.kind} arrived after {st['stage']}, before the survivor set was confirmed")
        survivors = _survivors(session.cid, st, message)
        self._check_signatures(st, survivors, message)
        session.memory.pop("secagg")  # one unmasking per round: never reveal a second set of shares
        plan: RoundPlan = st["plan"]
        me, rnd = session.cid, plan.round
        out = {}
        for j in holders_of(me, [p for p in st["peers"] if p in st["sharers"]]):
            if j == me:
                s_share, b_share = st["own"]
            elif j in st["inbox"]:
                key = keys.agree(st["c_sk"], st["peers"][j][0], keys.pair_info("share", rnd, me, j))
                plain = keys.decrypt(key, st["inbox"][j], share_ad(rnd, j, me))
                s_share, b_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:]
            else:
                continue
            out[f"b/{j}" if j in survivors else f"s/{j}"] = from_bytes(b_share if j in survivors else s_share)
        return Message(UNMASK, out)

    def _check_signatures(self, st: dict[str, Any], survivors: set[str], message: Message) -> None:
        """At least `quorum` (a majority of the cohort) survivors signed exactly this client's view of the
        plan, sharers and survivors; otherwise some honest clients may have been shown another view."""
        if survivors != st.get("survivors"):
            raise SecAggError("the survivor set changed between the consistency check and unmasking")
        statement = keys.consistency_statement(st["digest"], st["sharers"], survivors)
        signers = [name[len("sig/"):] for name in message.tensors if name.startswith("sig/")]
        for j in signers:
            if j not in survivors:
                raise SecAggError(f"consistency signature from {j!r}, who is not a survivor")
            keys.verify(self.registry, j, _blob(message, f"sig/{j}"), statement)
        if len(signers) < st["plan"].quorum:
            raise SecAggError(f"only {len(signers)} clients confirmed this client's view of the sharers and survivors; "
                              f"a majority of the cohort ({st['plan'].quorum}) must, so unmasking would be unsafe")


def encode_masked_input(plan: RoundPlan, delta: np.ndarray, metrics: Mapping[str, float], config: Any,
                        rng: np.random.Generator) -> np.ndarray:
    """The client's input to the sum: its quantised update (plus its share of distributed-DP noise) followed by
    the plan's summed metrics, each quantised into the same ring."""
    delta = np.asarray(delta, dtype=np.float64)
    if plan.noise > 0:
        delta = delta + rng.normal(0.0, distributed_noise_std(plan, _clip_of(config), delta.size), size=delta.shape)
    parts = [plan.quantizer().encode(delta, rng)]
    for (name, _, _), (quantizer, centre) in zip(plan.fields, plan.field_quantizers()):
        value = float(metrics.get(name, 0.0))
        value = value if math.isfinite(value) else 0.0
        parts.append(quantizer.encode(np.array([value - centre]), rng))
    return np.concatenate(parts)


def distributed_noise_std(plan: RoundPlan, clip: float, dim: int) -> float:
    """Each client's share of the distributed-DP noise: std z * (C + rounding bound) / sqrt(quorum), so the sum
    of any `quorum` or more survivors (fewer abort the round) carries at least the target std z * sensitivity."""
    return plan.noise * (clip + plan.quantizer().step * math.sqrt(dim)) / math.sqrt(plan.quorum)


def _clip_of(config: Any) -> float:
    """The L2 clip norm the client's central-DP half clipped to this round (the sensitivity of its input)."""
    from ..privacy.central import CLIP_KEY  # the privacy package builds secure aggregation: import late

    clip = config.get(CLIP_KEY) if isinstance(config, dict) else None
    if not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise SecAggError("distributed DP is on but the server sent no valid clip norm (config key 'dp_clip')")
    return float(clip)


def _blob(message: Message, name: str) -> bytes:
    if name not in message.tensors:
        raise SecAggError(f"{message.kind} carries no {name!r}")
    return as_bytes(message.tensors[name])


def _names(meta: Mapping[str, Any], key: str) -> set[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise SecAggError(f"the server's {key!r} is not a list of client ids")
    return set(names)


def _state(session: ClientSession, message: Message, previous: str | None) -> dict[str, Any]:
    """This round's secrets, checking the message follows stage `previous` of the same round."""
    st = session.memory.get("secagg")
    if st is None or st["plan"].round != message.meta.get("round"):
        raise SecAggError(f"{message.kind} for round {message.meta.get('round')} without a matching key advertisement")
    if previous is not None and st["stage"] != previous:
        raise SecAggError(f"{message.kind} arrived after {st['stage']}, expected after {previous}")
    return st


def _survivors(me: str, st: dict[str, Any], message: Message) -> set[str]:
    survivors = _names(message.meta, "survivors")
    if me not in survivors or not survivors <= st["sharers"]:
        raise SecAggError("the announced survivor set is not a subset of the clients that shared keys")
    live_holders = [j for j in holders_of(me, list(st["peers"])) if j in survivors]
    if len(live_holders) < st["plan"].threshold:
        raise SecAggError(f"only {len(live_holders)} of this client's share holders survived; "
                          f"the threshold is {st['plan'].threshold}, so unmasking would be unsafe")
    return survivors

