"""Buffered asynchronous training (FedBuff) and the virtual clock: staleness weights pinned to hand
computations, stale results dropped, exact resume, and equivalence to FedAvg when nothing is asynchronous."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedlearn import Client, FedAdam, FedAvg, InProcessPool, RoundFailedError, RunStore, Server, TorchClient, Update
from fedlearn.data import federate, load_digits
from fedlearn.server import ClientSampler
from fedlearn.server.async_loop import AsyncServer, staleness_weight
from fedlearn.simulation.clock import Fleet, VirtualClock
from fedlearn.simulation.clocked import ClockedPool, VirtualExecutor
from fedlearn.torch import MLP, state_of

ZERO = OrderedDict(w=np.zeros(3, dtype=np.float64))


class ConstantClient(Client):
    """Sends the same delta whatever the model: makes every server step a hand computation."""

    def __init__(self, cid: str, value: float) -> None:
        super().__init__(cid)
        self.value = value

    def fit(self, state, config) -> Update:
        return Update(self.cid, config["round"], np.full(3, self.value), 1, {"train_loss": 0.0})


def _constant_pool(values: dict[str, float]) -> InProcessPool:
    return InProcessPool(lambda cid: ConstantClient(cid, values[cid]), list(values))


def test_staleness_weights_match_closed_forms():
    sqrt, poly, const = staleness_weight(), staleness_weight("polynomial", 2.0), staleness_weight("constant")
    assert [sqrt(s) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert [poly(s) for s in (0, 1, 3)] == [1.0, 0.25, 1 / 16]
    assert const(0) == const(100) == 1.0
    assert [staleness_weight("poly", 1.0)(s) for s in (0, 1, 4)] == [1.0, 0.5, 0.2]  # the TOML spelling
    with pytest.raises(ValueError, match="unknown staleness"):
        staleness_weight("linear")


def test_buffered_steps_apply_staleness_weights_by_hand():
    # a finishes every 1s, b every 2.5s; K = 2. t=1,2: a, a -> step 1 = mean(a, a).
    # t=2.5: b (sent at version 0, now version 1: staleness 1); t=3: a (version 1, fresh) -> step 2.
    values = {"a": 0.3, "b": -2.0}
    clock = VirtualClock(Fleet(jitter_sigma=0.0, speeds={"a": 1.0, "b": 2.5}))
    server = AsyncServer(VirtualExecutor(_constant_pool(values), clock), FedAvg(), ZERO, buffer_size=2, concurrency=2)
    history = server.run(2)
    expected = 0.3 + (0.3 + (-2.0) / np.sqrt(2.0)) / 2
    np.testing.assert_allclose(server.params, np.full(3, expected), rtol=1e-12)
    assert [r.participants for r in history.rounds] == [["a", "a"], ["b", "a"]]
    assert history.rounds[1].metrics["staleness_max"] == 1.0 and history.rounds[1].metrics["clock"] == 3.0


class ScoredClient(ConstantClient):
    """A ConstantClient whose evaluation reports its own value as the score, on `examples` examples."""

    def __init__(self, cid: str, value: float, examples: int) -> None:
        super().__init__(cid, value)
        self.examples = examples

    def evaluate(self, state, config):
        return {"num_examples": self.examples, "score": self.value}


def test_async_federated_evaluation_combines_client_metrics_by_the_apps_rule():
    values, examples = {"a": 0.2, "b": 0.8, "c": 0.5}, {"a": 1, "b": 3, "c": 6}
    pool = InProcessPool(lambda cid: ScoredClient(cid, values[cid], examples[cid]), list(values))

    def best_client(results):  # a replacement rule: the best client's score, not the weighted mean
        return {"score": max(r.metrics["score"] for r in results), "clients": float(len(results))}

    server = AsyncServer(VirtualExecutor(pool, VirtualClock(Fleet())), FedAvg(), ZERO, buffer_size=1, concurrency=1,
                         eval_clients=3, evaluate_metrics=best_client)
    assert server.run(2).last["fed_score"] == 0.8 and server.history.last["fed_clients"] == 3.0
    default = AsyncServer(VirtualExecutor(pool, VirtualClock(Fleet())), FedAvg(), ZERO, buffer_size=1, concurrency=1,
                          eval_clients=3)
    assert default.run(1).last["fed_score"] == pytest.approx((0.2 * 1 + 0.8 * 3 + 0.5 * 6) / 10, rel=1e-12)


def test_results_older_than_max_staleness_are_dropped_with_the_reason():
    values = {"fast": 1.0, "slow": 100.0}
    clock = VirtualClock(Fleet(jitter_sigma=0.0, speeds={"fast": 1.0, "slow": 10.0}))
    server = AsyncServer(VirtualExecutor(_constant_pool(values), clock), FedAvg(), ZERO, buffer_size=1, concurrency=2,
                         max_staleness=3)
    history = server.run(12)
    # slow's first result (t=10) trained on version 0 while 9 steps were taken: dropped, never aggregated
    assert all("slow" not in r.participants for r in history.rounds)
    stale = [f for r in history.rounds for f in r.failures if f.client_id == "slow"]
    assert stale and stale[0].kind == "straggler" and "9 steps behind (max_staleness 3)" in stale[0].reason
    np.testing.assert_array_equal(server.params, np.full(3, 12.0))


def test_sync_deadline_drops_stragglers_and_bounds_round_time():
    values = {"a": 1.0, "b": 3.0}
    for deadline, used, seconds in ((None, {"a", "b"}, 5.0), (2.0, {"a"}, 2.0)):
        clock = VirtualClock(Fleet(jitter_sigma=0.0, speeds={"a": 1.0, "b": 5.0}))
        pool = ClockedPool(_constant_pool(values), clock, deadline=deadline)
        server = Server(pool, FedAvg(), ZERO, sampler=ClientSampler(fraction=1.0))
        record = server.run_round(1)
        assert set(record.participants) == used and clock.now == seconds
        if deadline:
            assert [f.kind for f in record.failures] == ["timeout"]


def test_fleet_availability_is_seeded_and_matches_its_online_fraction():
    fleet = Fleet(seed=4, mean_online=30.0, mean_offline=10.0)
    times = np.linspace(0, 20000, 20001)
    online = np.array([fleet.online("c", t) for t in times])
    assert abs(online.mean() - 0.75) < 0.05  # 30 / (30 + 10) of the time
    again = Fleet(seed=4, mean_online=30.0, mean_offline=10.0)
    assert all(again.online("c", t) == o for t, o in zip(times[::-997], online[::-997]))
    t = fleet.next_change("c", 100.0)
    assert fleet.online("c", t) != fleet.online("c", np.nextafter(t, 0))


def _digits_setup(num_clients: int):
    data = federate(load_digits(seed=0), "dirichlet", num_clients, seed=0, alpha=1.0)

    def model_fn():
        return MLP(64, 10, hidden=(16,))

    def client_fn(cid):
        x, y = data.clients[cid]
        return TorchClient(cid, model_fn, x, y, batch_size=16, lr=0.1)

    torch.manual_seed(0)
    return data, client_fn, state_of(model_fn())


def test_equal_speeds_and_k_equal_concurrency_is_fedavg_exactly():
    data, client_fn, init = _digits_setup(6)
    ids = data.client_ids
    sync = Server(InProcessPool(client_fn, ids), FedAvg(), init, sampler=ClientSampler(fraction=1.0), seed=2)
    sync.run(3)
    clock = VirtualClock(Fleet(speed_sigma=0.0, jitter_sigma=0.0))
    fedbuff = AsyncServer(VirtualExecutor(InProcessPool(client_fn, ids), clock), FedAvg(), init,
                          buffer_size=len(ids), concurrency=len(ids), seed=2)
    fedbuff.run(3)
    np.testing.assert_array_equal(fedbuff.params, sync.params)
    assert [r.metrics["staleness_max"] for r in fedbuff.history.rounds] == [0.0, 0.0, 0.0]


def _fedbuff(client_fn, ids, init, store):
    fleet = Fleet(seed=1, speed_sigma=1.0, jitter_sigma=0.3, mean_online=20.0, mean_offline=5.0)
    executor = VirtualExecutor(InProcessPool(client_fn, ids), VirtualClock(fleet))
    return AsyncServer(executor, FedAdam(server_lr=0.05), init, buffer_size=3, concurrency=5, max_staleness=4,
                       store=store, seed=9)


def test_async_run_resumes_exactly(tmp_path):
    data, client_fn, init = _digits_setup(10)
    ids = data.client_ids
    whole = _fedbuff(client_fn, ids, init, RunStore(tmp_path / "whole"))
    whole.run(8)

    first = _fedbuff(client_fn, ids, init, RunStore(tmp_path / "split"))
    first.run(4)
    first.store.close()
    resumed = _fedbuff(client_fn, ids, init, RunStore(tmp_path / "split"))  # a fresh process: new fleet, clock
    assert resumed.step == 4 and resumed.inflight
    resumed.run(8)
    np.testing.assert_array_equal(resumed.params, whole.params)
    assert [r.participants for r in resumed.history.rounds] == [r.participants for r in whole.history.rounds]
    assert [r.metrics["clock"] for r in resumed.history.rounds] == [r.metrics["clock"] for r in whole.history.rounds]
    assert any(f.kind == "drop" for r in whole.history.rounds for f in r.failures)  # offline periods did bite


def test_async_refuses_a_synchronous_store(tmp_path):
    data, client_fn, init = _digits_setup(4)
    store = RunStore(tmp_path)
    Server(InProcessPool(client_fn, data.client_ids), FedAvg(), init, sampler=ClientSampler(count=2), store=store)
    with pytest.raises(ValueError, match="synchronous run"):
        _fedbuff(client_fn, data.client_ids, init, store)


class BrokenClient(Client):
    def fit(self, state, config) -> Update:
        return Update(self.cid, config["round"], np.full(3, np.nan), 1)


def test_a_run_whose_results_are_all_unusable_stops_with_the_reason():
    pool = InProcessPool(BrokenClient, ["a", "b"])
    server = AsyncServer(VirtualExecutor(pool, VirtualClock(Fleet())), FedAvg(), ZERO, buffer_size=2, concurrency=2)
    with pytest.raises(RoundFailedError, match="results in a row were unusable after step 0.*non-finite"):
        server.run(3)

class _Claiming(ConstantClient):
    """Sends its constant delta with a claimed example count."""

    def __init__(self, cid: str, value: float, count: int) -> None:
        super().__init__(cid, value)
        self.count = count

    def fit(self, state, config) -> Update:
        return Update(self.cid, config["round"], np.full(3, self.value), self.count, {"train_loss": 0.0})


def test_a_huge_example_claim_weighs_no_more_than_max_examples_and_an_impossible_one_is_rejected():
    # a (1 example, +1) and b (claims 1e15 examples, +50) finish together every second; K = 2, no staleness.
    # With max_examples = 3, b weighs 3: each step moves (1 * 1 + 3 * 50) / 4 = 37.75, not ~50.
    clients = {"a": _Claiming("a", 1.0, 1), "b": _Claiming("b", 50.0, 10**15), "c": _Claiming("c", 9.0, 10**400)}
    clock = VirtualClock(Fleet(jitter_sigma=0.0, speeds={"a": 1.0, "b": 1.0, "c": 1.0}))
    pool = InProcessPool(clients.__getitem__, ["a", "b", "c"])
    server = AsyncServer(VirtualExecutor(pool, clock), FedAvg(), ZERO, buffer_size=2, concurrency=3, max_examples=3)
    history = server.run(2)
    np.testing.assert_allclose(server.params, np.full(3, 2 * 37.75), rtol=1e-12)
    rejected = [f for r in history.rounds for f in r.failures if f.client_id == "c"]
    assert rejected and all(f.kind == "rejected" and "num_examples must be in [1, 2**53]" in f.reason
                            for f in rejected)


def test_equal_speeds_and_k_equal_concurrency_is_the_weighted_mean_by_hand():
    # three clients, equally fast, K = concurrency = 3: every step takes one fresh (s = 0) result from each,
    # so a step is FedAvg's example-weighted mean: (1 * 1 + 1 * 2 + 2 * 6) / 4 = 3.75, three steps 11.25
    clients = {"a": _Claiming("a", 1.0, 1), "b": _Claiming("b", 2.0, 1), "c": _Claiming("c", 6.0, 2)}
    clock = VirtualClock(Fleet(speed_sigma=0.0, jitter_sigma=0.0))
    pool = InProcessPool(clients.__getitem__, list(clients))
    server = AsyncServer(VirtualExecutor(pool, clock), FedAvg(), ZERO, buffer_size=3, concurrency=3)
    history = server.run(3)
    np.testing.assert_allclose(server.params, np.full(3, 3 * 3.75), rtol=1e-12)
    assert [sorted(r.participants) for r in history.rounds] == [["a", "b", "c"]] * 3
    assert [r.metrics["staleness_max"] for r in history.rounds] == [0.0] * 3 and clock.now == 3.0


class _Recording(ConstantClient):
    seen: list = []

    def fit(self, state, config) -> Update:
        _Recording.seen.append(dict(config))
        return super().fit(state, config)


def test_every_task_carries_the_apps_fit_config_under_the_steps_own_instructions():
    pool = InProcessPool(lambda cid: _Recording(cid, 1.0), ["a", "b"])
    server = AsyncServer(VirtualExecutor(pool, VirtualClock(Fleet(jitter_sigma=0.0))), FedAvg(), ZERO, buffer_size=2,
                         concurrency=2, fit_config={"local_epochs": 7, "round": -1})
    _Recording.seen.clear()
    server.run(2)
    assert _Recording.seen and all(c["local_epochs"] == 7 for c in _Recording.seen)
    assert sorted(c["round"] for c in _Recording.seen)[:2] == [1, 1]  # the step's own round wins
