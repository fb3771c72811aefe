"""Secure aggregation against an actively malicious server: an adversarial server implementation drives honest
clients through the stages, lies to them, and tries to recover one client's update.

Lie 1, the split view: the server shows the target V and t-1 of its neighbours (L) that L is alive, so they
reveal V's self-mask seed, and shows everyone else that L dropped, so they reveal L's mask keys; with both the
server can strip every mask off V's masked input. Lie 2, a split plan: the server shows V a different cohort
than the others. Lie 3, a hidden key: the server lists a neighbour as a sharer without showing its keys."""
from __future__ import annotations

import numpy as np
import pytest

from fedlearn import InProcessPool
from fedlearn.messages import Message, as_bytes
from fedlearn.secagg import Identities, SecAggClient, SecAggConfig, SecAggProtocol, keys, prg, shamir
from fedlearn.secagg.client import holders_of
from fedlearn.secagg.protocol import ADVERTISE, CONSISTENCY, MASKED, SHARE, UNMASK, ClientPolicy, SecAggError
from vector_clients import VectorClient, known_delta, zero_state

N, DEGREE, DIM, TARGET = 40, 12, 300, "0"


class AdversarialServer:
    """Runs the protocol itself (no `SecAggProtocol` logic but the honest plan) over honest clients."""

    def __init__(self, policy: ClientPolicy = ClientPolicy(), config: SecAggConfig | None = None) -> None:
        self.ids = [str(i) for i in range(N)]
        identities = Identities.generate(self.ids)
        handlers = SecAggClient(identities.sign, identities.registry, policy).handlers()
        self.pool = InProcessPool(lambda cid: VectorClient(cid, DIM), self.ids, handlers=handlers)
        self.plan = SecAggProtocol(config or SecAggConfig(graph="sparse", degree=DEGREE), identities.registry,
                                   seed=7).plan(1, self.ids)
        self.refusals: dict[str, str] = {}

    def exchange(self, requests: dict[str, Message], **kwargs) -> dict[str, Message]:
        replies = self.pool.exchange(requests, **kwargs)
        for cid, reply in replies.items():
            if not isinstance(reply, Message):
                self.refusals[cid] = reply.reason
        return {cid: r for cid, r in replies.items() if isinstance(r, Message)}

    def keys_phase(self, plans: dict[str, dict] | None = None) -> None:
        """Advertise (each client its plan, honest by default) and share, showing everyone all keys."""
        plans = plans or {c: self.plan.to_meta() for c in self.ids}
        self.adverts = self.exchange({c: Message(ADVERTISE, meta=plans[c]) for c in self.ids})
        requests = {}
        for cid in self.adverts:
            tensors = {}
            for j in self.plan.neighbours(cid):
                if j in self.adverts:
                    tensors.update({f"c_pk/{j}": self.adverts[j].tensors["c_pk"],
                                    f"s_pk/{j}": self.adverts[j].tensors["s_pk"],
                                    f"sig/{j}": self.adverts[j].tensors["signature"]})
            requests[cid] = Message(SHARE, tensors, {"round": 1})
        shared = self.exchange(requests)
        self.inbox: dict[str, dict] = {c: {} for c in shared}
        for sender, reply in shared.items():
            for name, blob in reply.tensors.items():
                if name[3:] in self.inbox:
                    self.inbox[name[3:]][f"from/{sender}"] = blob

    def masked(self, sharers: dict[str, set[str]]) -> dict[str, Message]:
        return self.exchange({c: Message(MASKED, self.inbox[c], {"round": 1, "sharers": sorted(sharers[c]),
                                                                  "config": {"round": 1, "seed": 0}})
                              for c in sharers}, state=zero_state(DIM))

    def split_view_attack(self, forward_all_signatures: bool = False) -> np.ndarray | None:
        """The attack of issue 11; returns the server's reconstruction of the target's update, or None."""
        self.keys_phase()
        v, t = TARGET, self.plan.threshold
        around = set(self.plan.neighbours(v))
        # the t-1 neighbours of V with the most neighbours outside V's neighbourhood: those hold L's key shares
        score = {j: len(set(self.plan.neighbours(j)) - around - {v}) for j in around}
        lucky = set(sorted(around, key=lambda j: (-score[j], j))[: t - 1])
        group_a = {v} | lucky
        shown_a = set(self.ids) - (around - lucky)  # V's other neighbours "never shared keys"
        sharers = {c: shown_a if c in group_a else set(self.ids) for c in self.ids}
        masked = self.masked(sharers)
        survivors = {c: shown_a if c in group_a else set(self.ids) - lucky for c in masked}
        confirmed = self.exchange({c: Message(CONSISTENCY, meta={"round": 1, "survivors": sorted(survivors[c])})
                                   for c in masked})
        signatures = {c: r.tensors["signature"] for c, r in confirmed.items()}
        requests = {}
        for c in confirmed:
            same_view = {f"sig/{j}": s for j, s in signatures.items()
                         if forward_all_signatures or (j in group_a) == (c in group_a)}
            requests[c] = Message(UNMASK, same_view, {"round": 1, "survivors": sorted(survivors[c])})
        revealed = self.exchange(requests)
        return self._strip_masks(masked[v].tensors["masked"], lucky, revealed)

    def _strip_masks(self, y: np.ndarray, lucky: set[str], revealed: dict[str, Message]) -> np.ndarray | None:
        b_seed = self._recover(TARGET, "b", revealed)
        if b_seed is None:
            return None
        x = y - prg.expand(b_seed, y.size)
        s_pk_v = as_bytes(self.adverts[TARGET].tensors["s_pk"])
        for j in lucky:
            s_raw = self._recover(j, "s", revealed)
            if s_raw is None:
                return None
            mask = prg.expand(keys.agree(keys.load_private(s_raw), s_pk_v, keys.pair_info("mask", 1, TARGET, j)), y.size)
            x = x - mask if TARGET < j else x + mask
        return self.plan.quantizer().decode_sum(x[:DIM], 1)

    def _recover(self, owner: str, kind: str, revealed: dict[str, Message]) -> bytes | None:
        holders = holders_of(owner, self.plan.neighbours(owner))
        shares = {x: as_bytes(revealed[j].tensors[f"{kind}/{owner}"]) for x, j in enumerate(holders, start=1)
                  if j in revealed and f"{kind}/{owner}" in revealed[j].tensors}
        if len(shares) < self.plan.threshold:
            return None
        try:
            return shamir.combine(shares, self.plan.threshold)
        except shamir.ShamirError:
            return None


def _neighbourhood_quorum_only(self, st, survivors, message):
    """The check clients made before this defence: t signatures on the survivor set, t a neighbourhood majority."""
    signers = [name[4:] for name in message.tensors if name.startswith("sig/")]
    statement = keys.consistency_statement(st["digest"], st["sharers"], survivors)
    for j in signers:
        keys.verify(self.registry, j, as_bytes(message.tensors[f"sig/{j}"]), statement)
    if len(signers) < st["plan"].threshold:
        raise SecAggError("too few signatures")


def test_the_split_view_attack_works_against_a_neighbourhood_quorum(monkeypatch):
    """The attack is real: with the old per-neighbourhood quorum the server recovers the target's update."""
    monkeypatch.setattr(SecAggClient, "_check_signatures", _neighbourhood_quorum_only)
    server = AdversarialServer()
    recovered = server.split_view_attack()
    assert recovered is not None
    assert np.abs(recovered - known_delta(TARGET, DIM)).max() <= server.plan.quantizer().step


@pytest.mark.parametrize("forward_all_signatures", [False, True])
def test_clients_refuse_the_split_view_and_nothing_individual_is_learned(forward_all_signatures):
    server = AdversarialServer()
    recovered = server.split_view_attack(forward_all_signatures)
    assert recovered is None  # too few shares of V's self-mask seed ever left a client
    refused = {c for c, why in server.refusals.items()
               if ("a majority of the cohort" in why) or ("does not verify" in why)}
    assert TARGET in refused and len(refused) >= server.plan.threshold  # V and its t-1 misled neighbours
    why = server.refusals[TARGET]
    assert ("does not verify" if forward_all_signatures else "only 7 clients confirmed") in why


def test_clients_shown_different_plans_refuse_each_others_keys():
    server = AdversarialServer()
    other = SecAggProtocol(SecAggConfig(graph="sparse", degree=DEGREE), {}, seed=8).plan(1, server.ids)  # new graph
    plans = {c: server.plan.to_meta() for c in server.ids}
    plans[TARGET] = other.to_meta()
    server.keys_phase(plans)
    # V's advertisement was signed with its plan's digest: none of its neighbours accepts it, and V accepts none
    assert "signature of client '0' does not verify" in " ".join(server.refusals.values())
    assert TARGET in server.refusals and "does not verify" in server.refusals[TARGET]


def test_a_client_refuses_a_sharer_whose_keys_the_server_hid():
    server = AdversarialServer(config=SecAggConfig(graph="full"))
    server.keys_phase()
    hidden = server.plan.neighbours(TARGET)[0]
    server.inbox[TARGET] = {k: v for k, v in server.inbox[TARGET].items() if k != f"from/{hidden}"}
    # rerun the share stage for V alone without the hidden neighbour's keys: V must not mask without them
    requests = {TARGET: Message(MASKED, server.inbox[TARGET], {"round": 1, "sharers": server.ids, "config": {"round": 1}})}
    server.pool._memory[TARGET]["secagg"]["peers"].pop(hidden)
    server.exchange(requests, state=zero_state(DIM))
    assert f"says {hidden!r} shared keys but never showed this client its keys" in server.refusals[TARGET]


def test_a_distrustful_client_refuses_sparse_graphs_and_small_cohorts():
    server = AdversarialServer(policy=ClientPolicy(full_graph_only=True))
    reply = server.exchange({TARGET: Message(ADVERTISE, meta=server.plan.to_meta())})
    assert not reply and "accepts only the full graph" in server.refusals[TARGET]
    full = SecAggProtocol(SecAggConfig(graph="full"), {}).plan(1, server.ids)
    assert server.exchange({TARGET: Message(ADVERTISE, meta=full.to_meta())})[TARGET].kind == ADVERTISE
    server = AdversarialServer(policy=ClientPolicy(min_cohort=50))
    server.exchange({TARGET: Message(ADVERTISE, meta=full.to_meta())})
    assert "below this client's minimum of 50" in server.refusals[TARGET]
