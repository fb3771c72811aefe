"""Streaming aggregation: sums are folded update by update (O(d) server memory), with the same numbers as the
stacked computation; aggregators and features that need every update at once keep the stack and say why."""
from __future__ import annotations

import weakref

import numpy as np
import pytest

from fedlearn import Client, FedAvg, InProcessPool, Transform, Update
from fedlearn.aggregators import NormBounding, make_aggregator
from fedlearn.privacy import CentralDP, SampledGaussian
from fedlearn.server import ClientSampler, Server
from fedlearn.server.anomaly import AnomalyChecks
from fedlearn.strategies.base import Strategy
from fedlearn.strategies.fedavg import RunningWeightedMean, ServerSGD, weighted_mean
from fedlearn.types import Config, Failure, State
from vector_clients import VectorClient, known_delta, zero_state

DIM = 50


def stacked_mean(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted mean as a plain function: it does not declare `streams`, so the round loop stacks."""
    return np.average(deltas, axis=0, weights=weights)


def test_running_mean_matches_the_weighted_average_to_rounding():
    rng = np.random.default_rng(0)
    deltas, weights = rng.normal(size=(30, DIM)), rng.integers(0, 100, size=30).astype(float)
    running = weighted_mean.start()
    for delta, weight in zip(deltas, weights):
        running.add(delta, weight)
    expected = (weights[:, None] * deltas).sum(axis=0) / weights.sum()
    np.testing.assert_allclose(running.result(), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(running.result(), weighted_mean(deltas, weights), rtol=1e-12, atol=1e-15)


def test_running_mean_of_one_update_is_that_update_exactly_and_refuses_zero_weight():
    delta = np.random.default_rng(1).normal(size=DIM)
    running = RunningWeightedMean()
    running.add(delta, 7)
    assert np.array_equal(running.result(), delta)
    empty = RunningWeightedMean()
    empty.add(delta, 0)
    with pytest.raises(ValueError, match="positive total weight"):
        empty.result()
    with pytest.raises(ValueError, match="does not match"):
        running.add(np.zeros(DIM + 1), 1)


def test_norm_bounding_streams_only_with_a_fixed_bound_and_clips_each_update():
    rng = np.random.default_rng(2)
    deltas, weights = rng.normal(size=(8, DIM)) * rng.uniform(0.1, 5, size=(8, 1)), np.arange(1.0, 9.0)
    fixed = NormBounding(max_norm=3.0)
    running = fixed.start()
    for delta, weight in zip(deltas, weights):
        running.add(delta, weight)
    norms = np.linalg.norm(deltas, axis=1)
    clipped = deltas * np.minimum(1.0, 3.0 / norms)[:, None]
    np.testing.assert_allclose(running.result(), (weights[:, None] * clipped).sum(0) / weights.sum(), rtol=1e-12)
    assert fixed.streams and not NormBounding().streams
    with pytest.raises(ValueError, match="needs every update at once"):
        NormBounding().start()


class TrackedClient(Client):
    """A `VectorClient` that records a weak reference to every delta it sends, so a test can count how many
    updates the server still holds when the next client trains."""

    def __init__(self, cid: str, sent: list, alive_at_fit: list) -> None:
        super().__init__(cid)
        self.sent, self.alive_at_fit = sent, alive_at_fit

    def fit(self, state: State, config: Config) -> Update:
        self.alive_at_fit.append(sum(ref() is not None for ref in self.sent))
        delta = known_delta(self.cid, DIM)
        self.sent.append(weakref.ref(delta))
        return Update(self.cid, int(config["round"]), delta, 10 + int(self.cid), {"train_loss": 1.0})


def _held_updates(strategy: Strategy, **server_args) -> list[int]:
    sent, alive = [], []
    pool = InProcessPool(lambda cid: TrackedClient(cid, sent, alive), [str(k) for k in range(12)])
    Server(pool, strategy, zero_state(DIM), sampler=ClientSampler(count=12, seed=0), **server_args).run(1)
    return alive


def test_a_streaming_round_holds_at_most_one_earlier_update_while_a_stacked_one_holds_them_all():
    assert max(_held_updates(FedAvg())) <= 1
    stacked = _held_updates(Strategy(make_aggregator("median"), ServerSGD()))
    assert stacked[-1] == 11  # every earlier update is still in memory when the last client trains
    assert max(_held_updates(FedAvg(), anomaly_checks=AnomalyChecks())) == 11


def _run(strategy: Strategy, rounds: int = 3, transforms=(), **server_args) -> Server:
    pool = InProcessPool(lambda cid: VectorClient(cid, DIM), [str(k) for k in range(20)])
    server = Server(pool, strategy, zero_state(DIM), sampler=ClientSampler(count=8, seed=3), seed=3,
                    transforms=transforms, **server_args)
    server.run(rounds)
    return server


def test_streamed_fedavg_ends_where_the_stacked_computation_does():
    streamed, stacked = _run(FedAvg(server_lr=0.7)), _run(Strategy(stacked_mean, ServerSGD(0.7)))
    assert streamed.stacking_reason is None
    assert "needs every update at once" in stacked.stacking_reason
    np.testing.assert_allclose(streamed.params, stacked.params, rtol=1e-12, atol=1e-15)
    assert not np.allclose(streamed.params, 0.0)
    assert [r.participants for r in streamed.history.rounds] == [r.participants for r in stacked.history.rounds]


def test_streamed_central_dp_ends_where_the_stacked_computation_does():
    def dp() -> CentralDP:
        return CentralDP(0.8, SampledGaussian(1.0, 20, 8, "fixed"), 1e-5, rng=np.random.default_rng(5))

    streamed = _run(FedAvg(), transforms=[dp()])
    stacked = _run(Strategy(stacked_mean, ServerSGD()), transforms=[dp()])
    assert streamed.stacking_reason is None
    np.testing.assert_allclose(streamed.params, stacked.params, rtol=1e-12, atol=1e-15)
    assert streamed.history.metric("dp_epsilon") == stacked.history.metric("dp_epsilon")


class RefuseOdd(Transform):
    """A per-update server half that refuses clients with odd ids and halves the weight of the others."""

    name = "refuse_odd"
    per_update = True

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        kept = [Update(u.client_id, u.round, u.delta, 5 + int(u.client_id), u.metrics) for u in updates
                if int(u.client_id) % 2 == 0]
        return kept, [Failure(u.client_id, "rejected", "odd") for u in updates if int(u.client_id) % 2]


def test_a_streamed_round_runs_the_server_halves_and_records_failures_as_the_stacked_one():
    streamed = _run(FedAvg(), transforms=[RefuseOdd()])
    stacked = _run(Strategy(stacked_mean, ServerSGD()), transforms=[RefuseOdd()])
    assert streamed.stacking_reason is None
    np.testing.assert_allclose(streamed.params, stacked.params, rtol=1e-12, atol=1e-15)
    for a, b in zip(streamed.history.rounds, stacked.history.rounds, strict=True):
        assert a.failures == b.failures and a.participants == b.participants
        assert a.failures and all(int(c) % 2 == 0 for c in a.participants)


def test_the_audit_hashes_of_a_streamed_round_are_those_of_the_updates():
    from fedlearn.audit.record import update_digest
    from fedlearn.server.store import RoundEvidence

    seen: list[RoundEvidence] = []
    server = _run(FedAvg(), rounds=0)

    class Spy:
        def commit_round(self, rnd, state, strategy_state, metrics, participants, failures, note="", *, evidence):
            seen.append(evidence)

    server.store = Spy()
    record = server.run_round(1)
    expected = {c: update_digest(Update(c, 1, known_delta(c, DIM), 10)) for c in record.participants}
    assert seen[0].update_hashes == expected


def test_features_that_need_every_update_say_why_the_round_stacks():
    pool = InProcessPool(lambda cid: VectorClient(cid, DIM), ["0", "1", "2"])

    def reason(strategy: Strategy, **kw) -> str | None:
        return Server(pool, strategy, zero_state(DIM), sampler=ClientSampler(count=3), **kw).stacking_reason

    assert reason(FedAvg()) is None
    assert "median" in reason(Strategy(make_aggregator("median"), ServerSGD()))
    assert "krum" in reason(Strategy(make_aggregator("krum", f=0), ServerSGD()))
    assert reason(Strategy(make_aggregator("norm_bounding", max_norm=1.0), ServerSGD())) is None
    assert "anomaly checks" in reason(FedAvg(), anomaly_checks=AnomalyChecks())
