"""Client side of secure aggregation: one handler per stage, with the round's secrets kept in the client's
session memory. Every handler checks that it follows the previous stage of the same round, so a replayed
or reordered message is refused instead of leaking a second set of shares."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..messages import ClientSession, Handler, Message, as_bytes, from_bytes
from . import keys, prg, shamir
from .protocol import ADVERTISE, CONSISTENCY, MASKED, SHARE, UNMASK, RoundPlan, SecAggError

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
    client's identity key; `registry` holds every client's identity public key (the trusted PKI)."""

    def __init__(self, sign: Signer, registry: Mapping[str, bytes]) -> None:
        self.sign, self.registry = sign, registry

    def handlers(self) -> dict[str, Handler]:
        return {ADVERTISE: self.advertise, SHARE: self.share, MASKED: self.masked,
                CONSISTENCY: self.consistency, UNMASK: self.unmask}

    def advertise(self, session: ClientSession, message: Message) -> Message:
        plan = RoundPlan.from_meta(message.meta, session.cid)
        c_sk, s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        c_pk, s_pk = keys.public_bytes(c_sk), keys.public_bytes(s_sk)
        signature = self.sign(session.cid, keys.advertisement(plan.round, session.cid, c_pk, s_pk))
        session.memory["secagg"] = {"stage": ADVERTISE, "plan": plan, "c_sk": c_sk, "s_sk": s_sk}
        return Message(ADVERTISE, {"c_pk": from_bytes(c_pk), "s_pk": from_bytes(s_pk), "signature": from_bytes(signature)})

    def share(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, ADVERTISE)
        plan: RoundPlan = st["plan"]
        me, rnd = session.cid, plan.round
        peers: dict[str, tuple[bytes, bytes]] = {}
        for j in plan.neighbours:
            if f"c_pk/{j}" not in message.tensors:
                continue
            c_pk, s_pk = as_bytes(message.tensors[f"c_pk/{j}"]), as_bytes(message.tensors[f"s_pk/{j}"])
            keys.verify(self.registry, j, as_bytes(message.tensors[f"sig/{j}"]), keys.advertisement(rnd, j, c_pk, s_pk))
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
        sharers = set(message.meta.get("sharers", []))
        if me not in sharers:
            raise SecAggError("the server's list of clients that shared keys leaves this client out")
        live = [j for j in st["peers"] if j in sharers]
        if len(live) + 1 < plan.threshold:
            raise SecAggError(f"only {len(live)} neighbours shared keys; the threshold is {plan.threshold}")
        st["inbox"] = {j: as_bytes(message.tensors[f"from/{j}"]) for j in live if f"from/{j}" in message.tensors}
        update = session.fit(dict(message.meta.get("config", {})))
        x = plan.quantizer().encode(update.delta, np.random.default_rng())
        y = x + prg.expand(st["seed"], x.size)
        for j in live:
            y += pair_mask(st["s_sk"], st["peers"][j][1], rnd, me, j, x.size)
        st.update(stage=MASKED, sharers=sharers)
        meta = {"round": update.round, "num_examples": int(update.num_examples),
                "metrics": {k: float(v) for k, v in update.metrics.items()}, "partial": bool(update.partial)}
        return Message(MASKED, {"masked": y}, meta)

    def consistency(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, MASKED)
        survivors = _survivors(session.cid, st, message)
        statement = keys.survivors_statement(st["plan"].round, survivors)
        st.update(stage=CONSISTENCY, survivors=survivors)
        return Message(CONSISTENCY, {"signature": from_bytes(self.sign(session.cid, statement))})

    def unmask(self, session: ClientSession, message: Message) -> Message:
        st = _state(session, message, None)
        plan: RoundPlan = st["plan"]
        if st["stage"] != (CONSISTENCY if plan.consistency_check else MASKED):
            raise SecAggError(f"{message.kind} arrived after {st['stage']}, before the survivor set was confirmed")
        survivors = _survivors(session.cid, st, message)
        if plan.consistency_check:
            self._check_signatures(st, survivors, message)
        session.memory.pop("secagg")  # one unmasking per round: never reveal a second set of shares
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
        if survivors != st.get("survivors"):
            raise SecAggError("the survivor set changed between the consistency check and unmasking")
        statement = keys.survivors_statement(st["plan"].round, survivors)
        signers = [name[len("sig/"):] for name in message.tensors if name.startswith("sig/")]
        for j in signers:
            if j not in survivors:
                raise SecAggError(f"consistency signature from {j!r}, who is not a survivor")
            keys.verify(self.registry, j, as_bytes(message.tensors[f"sig/{j}"]), statement)
        if len(signers) < st["plan"].threshold:
            raise SecAggError(f"only {len(signers)} survivors confirmed the survivor set; "
                              f"the threshold is {st['plan'].threshold}")


def _state(session: ClientSession, message: Message, previous: str | None) -> dict[str, Any]:
    """This round's secrets, checking the message follows stage `previous` of the same round."""
    st = session.memory.get("secagg")
    if st is None or st["plan"].round != message.meta.get("round"):
        raise SecAggError(f"{message.kind} for round {message.meta.get('round')} without a matching key advertisement")
    if previous is not None and st["stage"] != previous:
        raise SecAggError(f"{message.kind} arrived after {st['stage']}, expected after {previous}")
    return st


def _survivors(me: str, st: dict[str, Any], message: Message) -> set[str]:
    survivors = set(message.meta.get("survivors", []))
    if me not in survivors or not survivors <= st["sharers"]:
        raise SecAggError("the announced survivor set is not a subset of the clients that shared keys")
    live_holders = [j for j in holders_of(me, list(st["peers"])) if j in survivors]
    if len(live_holders) < st["plan"].threshold:
        raise SecAggError(f"only {len(live_holders)} of this client's share holders survived; "
                          f"the threshold is {st['plan'].threshold}, so unmasking would be unsafe")
    return survivors

