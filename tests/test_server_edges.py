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
