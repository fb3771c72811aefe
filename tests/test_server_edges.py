"""Round-loop settings at their edges, and what a fresh run store holds, pinned by hand."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlearn import Client, RoundFailedError, Update
from fedlearn.server import ClientSampler, RunStore, Server
from fedlearn.simulation import InProcessPool
from fedlearn.strategies import FedAvgM


class Crashing(Client):
    def fit(self, state, config):
        raise RuntimeError("boom")


class Steady(Client):
    def fit(self, state, config):
        return Update(self.cid, int(config["round"]), np.full(3, 1.0), 2)


def _server(client, store=None, **kwargs):
    return Server(InProcessPool(client, ["a", "b"]), FedAvgM(momentum=0.5), OrderedDict(w=np.arange(3.0)),
                  sampler=ClientSampler(fraction=1.0), store=store, anomaly_checks=None, **kwargs)


def test_max_failed_rounds_zero_stops_at_the_first_failed_round_and_negative_is_refused():
    server = _server(Crashing, max_failed_rounds=0)
    with pytest.raises(RoundFailedError, match=r"1 rounds in a row failed \(max_failed_rounds=0\)"):
        server.run(5)
    assert server.round == 1
    with pytest.raises(ValueError, match="max_failed_rounds must be >= 0, got -1"):
        _server(Crashing, max_failed_rounds=-1)
    with pytest.raises(ValueError, match="min_clients must be >= 1, got 0"):
        _server(Crashing, min_clients=0)


def test_min_clients_equal_to_the_cohort_still_runs():
    server = _server(Steady, min_clients=2)
    server.run(2)
    np.testing.assert_array_equal(server.params, np.arange(3.0) + 1.0 + 1.5)  # momentum 0.5: steps 1, 1.5
    assert server.history.metric("clients_used") == [2.0, 2.0]


def test_a_fresh_store_holds_the_initial_model_as_round_zero(tmp_path):
    server = _server(Steady, store=RunStore(tmp_path))
    assert server.store.last_round() == 0 and server.store.history() == []
    state, strategy_state = server.store.load_round(0)
    np.testing.assert_array_equal(state["w"], np.arange(3.0))
    assert strategy_state == {}  # no velocity before the first step
    server.run(1)
    server.store.close()
    again = _server(Steady, store=RunStore(tmp_path))
    assert again.round == 1
    np.testing.assert_array_equal(again.strategy.state_dict()["server_opt/velocity"], np.full(3, 1.0))
    again.store.close()


class Evaluated(Steady):
    """Client i evaluates to accuracy i / 10 on i examples (client "0" has none and must not count)."""

    def evaluate(self, state, config):
        i = int(self.cid)
        return {"accuracy": i / 10, "num_examples": float(i)}


def test_federated_evaluation_weights_clients_by_their_examples():
    ids = ["0", "1", "2", "3"]
    server = Server(InProcessPool(Evaluated, ids), FedAvgM(), OrderedDict(w=np.zeros(3)),
                    sampler=ClientSampler(count=1), eval_clients=4, anomaly_checks=None)
    server.run(1)
    # (1 * 0.1 + 2 * 0.2 + 3 * 0.3) / 6, with the example-less client left out
    assert server.history.last["fed_accuracy"] == pytest.approx(1.4 / 6, rel=1e-12)


def test_a_failed_round_names_the_first_three_failures():
    server = Server(InProcessPool(Crashing, ["a", "b", "c", "d"]), FedAvgM(), OrderedDict(w=np.zeros(3)),
                    sampler=ClientSampler(fraction=1.0), anomaly_checks=None, max_failed_rounds=5)
    record = server.run_round(1)
    assert record.note.startswith("round 1: only 0 of 4 sampled clients returned usable updates, min_clients is 1")
    assert "a: " in record.note and "c: " in record.note and "d: " not in record.note
    assert record.metrics["round_failed"] == 1.0 and record.metrics["clients_failed"] == 4.0


def test_a_run_store_creates_its_nested_folder(tmp_path):
    store = RunStore(tmp_path / "a" / "b" / "run")
    assert (tmp_path / "a" / "b" / "run" / "run.sqlite").exists() and store.last_round() is None
    store.set_meta("config", {"x": 1})
    assert store.get_meta("config") == {"x": 1} and store.get_meta("missing", 7) == 7
    store.close()


def test_a_client_sent_value_is_shown_whole_up_to_40_characters_and_cut_after():
    from fedlearn.server.validate import describe

    assert describe("x" * 38) == "'" + "x" * 38 + "'"  # repr: 40 characters, shown whole
    assert describe("x" * 39) == "'" + "x" * 36 + "..."  # 41 would be too long: 37 characters and an ellipsis
    assert describe(2**65) == "an integer of 66 bits" and describe(2**63) == str(2**63)
