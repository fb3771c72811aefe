"""The round loop: exact FedAvg math, seeded determinism, and rounds that survive bad or missing clients."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedlearn import (Client, FaultInjector, FedAvg, RoundFailedError, RunStore, TorchClient, Update, run_simulation,
                      simulate)
from fedlearn.data import load_digits
from fedlearn.params import Layout
from fedlearn.strategies import weighted_mean
from fedlearn.torch import MLP, state_of

SMALL = {"num_clients": 20, "clients_per_round": 5, "rounds": 3, "local_epochs": 1, "eval_clients": 0}


def _mlp() -> torch.nn.Module:
    return MLP(64, 10, hidden=(32,))


def test_weighted_mean_matches_hand_computation():
    deltas = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    weights = np.array([1.0, 2.0, 3.0])
    expected = np.array([(1 + 6 + 15) / 6, (2 + 8 + 18) / 6])
    np.testing.assert_allclose(weighted_mean(deltas, weights), expected, rtol=1e-15)
    with pytest.raises(ValueError, match="positive total weight"):
        weighted_mean(deltas, np.zeros(3))


def test_fedavg_with_one_client_equals_centralized_sgd_exactly():
    data = load_digits()
    x, y = data.x_train[:300], data.y_train[:300]
    epochs, rounds, batch, lr = 2, 3, 32, 0.1
    client = TorchClient("only", _mlp, x, y, local_epochs=epochs, batch_size=batch, lr=lr, shuffle=False)
    result = run_simulation(lambda cid: client, ["only"], _mlp, strategy=FedAvg(), rounds=rounds, seed=3)

    torch.manual_seed(3)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(epochs * rounds):
        for start in range(0, len(x), batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[start:start + batch]), yt[start:start + batch]).backward()
            opt.step()
    reference = state_of(model)
    for name, value in reference.items():
        assert np.array_equal(result.final_state[name], value), name


def test_same_seed_gives_bit_identical_model_and_other_seed_differs():
    a = simulate({**SMALL, "seed": 5}).final_state
    b = simulate({**SMALL, "seed": 5}).final_state
    c = simulate({**SMALL, "seed": 6}).final_state
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_fedavg_on_digits_iid_reaches_93_percent():
    result = simulate({"partition": "iid", "num_clients": 50, "clients_per_round": 10, "rounds": 20,
                       "eval_clients": 5})
    assert result.accuracy >= 0.93
    assert "fed_accuracy" in result.history.last and "train_loss" in result.history.last


def test_converges_with_30_percent_of_clients_failing(tmp_path):
    cfg = {"num_clients": 50, "clients_per_round": 10, "rounds": 20, "crash_rate": 0.15, "drop_rate": 0.15,
           "partition": "iid", "eval_clients": 0}
    result = simulate(cfg, run_dir=tmp_path)
    assert result.accuracy >= 0.90
    failures = [f for r in result.history.rounds for f in r.failures]
    assert {f.kind for f in failures} == {"crash", "drop"}
    assert 0.15 < len(failures) / (20 * 10) < 0.45
    store = RunStore(tmp_path)
    stored = [f for r in store.history() for f in r.failures]
    store.close()
    assert stored == failures and all("injected" in f.reason for f in stored)


class _ScriptedClient(Client):
    """Returns a fixed delta; `mode` makes it misbehave in one specific way."""

    def __init__(self, cid: str, mode: str, size: int) -> None:
        super().__init__(cid)
        self.mode, self.size = mode, size

    def fit(self, state, config):
        delta = np.full(self.size, 1.0)
        rnd, cid = config["round"], self.cid
        if self.mode == "raise":
            raise RuntimeError("disk full")
        if self.mode == "nan":
            delta[0] = np.nan
        if self.mode == "shape":
            delta = np.ones(self.size + 1)
        if self.mode == "round":
            rnd = rnd + 7
        if self.mode == "impostor":
            cid = "somebody-else"
        if self.mode == "big":
            delta = delta * 100.0
        return Update(cid, rnd, delta, 10)


def _scripted_run(modes: dict[str, str], **kwargs):
    state = OrderedDict(w=np.zeros(4, dtype=np.float32))
    size = Layout.of(state).size
    return run_simulation(lambda cid: _ScriptedClient(cid, modes[cid], size), list(modes),
                          initial_state=state, **kwargs)


def test_bad_updates_are_rejected_with_reasons_and_the_round_goes_on():
    modes = {"ok1": "ok", "ok2": "ok", "raise": "raise", "nan": "nan", "shape": "shape", "round": "round",
             "impostor": "impostor"}
    result = _scripted_run(modes, rounds=1)
    record = result.history.rounds[0]
    assert sorted(record.participants) == ["ok1", "ok2"]
    reasons = {f.client_id: f.reason for f in record.failures}
    assert "disk full" in reasons["raise"]
    assert "non-finite" in reasons["nan"]
    assert "shape" in reasons["shape"]
    assert "round" in reasons["round"]
    assert "claiming to be 'somebody-else'" in reasons["impostor"]
    np.testing.assert_array_equal(result.final_state["w"], np.ones(4, dtype=np.float32))


def test_too_few_updates_keeps_the_model_and_eventually_stops_the_run():
    modes = {"a": "raise", "b": "raise", "c": "ok"}
    with pytest.raises(RoundFailedError, match="rounds in a row failed"):
        _scripted_run(modes, rounds=10, min_clients=2)
    result = _scripted_run({"a": "raise", "b": "ok", "c": "ok"}, rounds=2, min_clients=3, max_failed_rounds=5)
    assert all(r.metrics["round_failed"] == 1.0 for r in result.history.rounds)
    np.testing.assert_array_equal(result.final_state["w"], np.zeros(4, dtype=np.float32))


def test_fedprox_beats_fedavg_with_90_percent_stragglers_on_synthetic():
    """FedProx paper (Li et al. 2020), Synthetic(1,1): with 90% stragglers, FedAvg drops them and ends with a
    higher training loss than FedProx (mu=1), which uses their partial work."""
    from fedlearn import FedProx
    from fedlearn.data import make_synthetic
    from fedlearn.torch import LogisticRegression, evaluate_model, load_state

    data = make_synthetic(1.0, 1.0, 30, seed=0)
    x_all = torch.as_tensor(np.concatenate([x for x, _ in data.clients.values()]))
    y_all = torch.as_tensor(np.concatenate([y for _, y in data.clients.values()]))

    def model_fn():
        return LogisticRegression(60, 10)

    def client_fn(cid):
        x, y = data.clients[cid]
        return TorchClient(cid, model_fn, x, y, local_epochs=20, batch_size=10, lr=0.01)

    losses = {}
    for name, strategy in (("fedavg", FedAvg()), ("fedprox", FedProx(mu=1.0))):
        result = run_simulation(client_fn, data.client_ids, model_fn, strategy=strategy, rounds=12,
                                clients_per_round=10, faults=FaultInjector(straggler_rate=0.9, seed=0),
                                max_failed_rounds=12, seed=0)
        model = model_fn()
        load_state(model, result.final_state)
        losses[name] = evaluate_model(model, x_all, y_all)["loss"]
    assert losses["fedprox"] < 0.8 * losses["fedavg"], losses


class _Claims(Client):
    """Sends a +1 update carrying the given (possibly hostile) example count, metrics and partial flag."""

    def __init__(self, cid, num_examples=10, metrics=None, partial=False):
        super().__init__(cid)
        self.num_examples, self.metrics, self.partial = num_examples, metrics or {}, partial

    def fit(self, state, config):
        return Update(self.cid, int(config["round"]), np.ones(3), self.num_examples, self.metrics, self.partial)


@pytest.mark.parametrize("claim, reason", [
    ({"num_examples": 10**400}, "num_examples must be in [1, 2**53], got an integer of 1329 bits"),
    ({"num_examples": 2**53 + 1}, "num_examples must be in [1, 2**53]"),
    ({"num_examples": 0}, "num_examples must be in [1, 2**53], got 0"),
    ({"num_examples": True}, "num_examples must be an integer, got bool"),
    ({"num_examples": 12.5}, "num_examples must be an integer, got float 12.5"),
    ({"num_examples": "x"}, "num_examples must be an integer, got str 'x'"),
    ({"metrics": {"train_loss": float("nan")}}, "metric 'train_loss' must be finite, got nan"),
    ({"metrics": {"train_loss": 10**400}}, "metric 'train_loss' must be finite"),
    ({"metrics": {"train_loss": "low"}}, "metric 'train_loss' must be a number, got str"),
    ({"metrics": {f"m{i}": 1.0 for i in range(65)}}, "65 metrics exceed the limit of 64"),
    ({"partial": "yes"}, "partial must be true or false"),
])
def test_a_hostile_value_rejects_only_its_senders_update(claim, reason):
    clients = {"good": _Claims("good"), "bad": _Claims("bad", **claim)}
    result = run_simulation(clients.__getitem__, ["good", "bad"], initial_state=OrderedDict(w=np.zeros(3)),
                            rounds=1, anomaly_checks=None)
    [record] = result.history.rounds
    assert record.participants == ["good"]
    [failure] = record.failures
    assert failure.client_id == "bad" and failure.kind == "rejected" and reason in failure.reason
    np.testing.assert_array_equal(result.final_state["w"], 1.0)


def test_max_examples_caps_a_claimed_count_at_its_fedavg_weight():
    clients = {"a": _Claims("a", num_examples=10), "b": _Claims("b", num_examples=10**15)}
    clients["b"].fit = lambda state, config: Update("b", int(config["round"]), np.full(3, 50.0), 10**15)
    result = run_simulation(clients.__getitem__, ["a", "b"], initial_state=OrderedDict(w=np.zeros(3)), rounds=1,
                            anomaly_checks=None, max_examples=30)
    np.testing.assert_allclose(result.final_state["w"], (10 * 1 + 30 * 50) / 40)  # not ~50: b weighs 30, not 1e15


def test_fednova_rejects_an_update_without_its_step_count_instead_of_failing_the_round():
    from fedlearn import FedNova

    clients = {"a": _Claims("a", metrics={"steps": 2.0}), "b": _Claims("b", metrics={"steps": float("inf")}),
               "c": _Claims("c")}
    result = run_simulation(clients.__getitem__, ["a", "b", "c"], initial_state=OrderedDict(w=np.zeros(3)),
                            strategy=FedNova(), rounds=1, anomaly_checks=None)
    [record] = result.history.rounds
    assert record.participants == ["a"]
    reasons = {f.client_id: f.reason for f in record.failures}
    assert "must be finite" in reasons["b"] and "FedNova needs metrics['steps']" in reasons["c"]


def test_a_rounds_client_seeds_are_numpys_seed_sequence_hash_computed_at_once():
    """The batched seeds are numpy's own SeedSequence states of (seed, round, crc32(id)), for ids of every
    kind, and seeds or rounds past 32 bits (which take the one-by-one way)."""
    import zlib

    from fedlearn.server.sampling import client_seeds

    ids = [f"client_{i}" for i in range(300)] + ["", "ü" * 40, "f0001_12"]
    for seed, rnd in [(0, 1), (4, 30), (2**32 - 1, 2**32 - 1), (2**32, 2), (12345678901, 7)]:
        expected = [int(np.random.SeedSequence([seed, rnd, zlib.crc32(c.encode())]).generate_state(1)[0])
                    for c in ids]
        assert client_seeds(seed, rnd, ids) == expected
