"""Worker processes run federated evaluation and the stages of secure aggregation themselves: each client's
memory stays in one worker across the stages, transforms whose client half keeps no state run there too, and
a worker that dies costs only the clients it held."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedlearn import Client, InProcessPool
from fedlearn.secagg import Identities, SecAggClient, SecAggConfig, SecAggProtocol
from fedlearn.secagg.protocol import MASKED, STAGES
from fedlearn.server import ClientSampler, Server
from fedlearn.simulation.multiprocess import ProcessPool
from fedlearn.strategies import make_strategy
from fedlearn.transforms import Transform
from vector_clients import VectorClient, known_delta, zero_state

DIM = 300


class _Scorer(Client):
    """Evaluates to <state, weights of cid> and reports the process that computed it."""

    def fit(self, state, config):
        raise AssertionError("not trained here")

    def evaluate(self, state, config):
        return {"num_examples": 3 + int(self.cid), "score": float(state["w"] @ known_delta(self.cid, DIM)),
                "pid": float(os.getpid())}


def test_federated_evaluation_runs_in_the_workers_and_matches_the_sequential_pool():
    ids = [str(i) for i in range(7)]
    state = OrderedDict(w=np.linspace(-1, 1, DIM))
    pool = ProcessPool(InProcessPool(_Scorer, ids), workers=3)
    try:
        results = pool.evaluate(state, {cid: {"round": 1} for cid in ids})
    finally:
        pool.close()
    assert [r.client_id for r in results] == ids
    for r in results:
        assert r.num_examples == 3 + int(r.client_id)
        assert r.metrics["score"] == pytest.approx(float(state["w"] @ known_delta(r.client_id, DIM)), rel=1e-12)
    pids = {r.metrics["pid"] for r in results}
    assert os.getpid() not in pids and len(pids) == 3


class Halve(Transform):
    """Halves each update on the client; keeps nothing between calls."""

    name = "halve"
    stateful_client = False

    def client(self, update, config):
        update.delta = update.delta / 2
        return update


class CountingHalve(Transform):
    """Halves each update and counts its calls: a client half with state (a user's transform declares
    nothing, so it is taken to keep state)."""

    name = "counting_halve"

    def __init__(self) -> None:
        self.calls = 0

    def client(self, update, config):
        self.calls += 1
        update.delta = update.delta / 2
        return update


def recording(handlers: dict, log_file, exit_on: tuple[str, str] | None = None) -> dict:
    """Handlers that append "stage cid pid" to `log_file`; `exit_on` = (stage, cid) kills the process running
    that client's stage, once (a worker dying mid-protocol)."""
    def wrap(stage, handler):
        def handle(session, message):
            with open(log_file, "a") as out:
                out.write(f"{stage} {session.cid} {os.getpid()}\n")
            if exit_on == (stage, session.cid) and not os.path.exists(f"{log_file}.killed"):
                open(f"{log_file}.killed", "w").close()
                os._exit(3)
            return handler(session, message)
        return handle
    return {stage: wrap(stage, h) for stage, h in handlers.items()}


def _secagg_run(n: int, log_file, *, transforms=(), workers: int = 3, exit_on=None):
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)
    handlers = recording(SecAggClient(identities.sign, identities.registry).handlers(), log_file, exit_on)
    protocol = SecAggProtocol(SecAggConfig(graph="full"), identities.registry, seed=1)
    pool = ProcessPool(InProcessPool(lambda cid: VectorClient(cid, DIM), ids, handlers=handlers), workers,
                       transforms=transforms)
    server = Server(pool, make_strategy("fedavg"), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                    protocol=protocol, anomaly_checks=None, transforms=transforms)
    return server, protocol


def stage_calls(log_file) -> list[tuple[str, str, int]]:
    return [(s, c, int(p)) for s, c, p in (line.split() for line in open(log_file))]


def quantum(n: int) -> float:
    return SecAggConfig().quantizer(n).step


def test_secure_aggregation_stages_run_in_the_workers_each_client_always_in_the_same_one(tmp_path):
    n, log_file = 9, tmp_path / "calls"
    server, protocol = _secagg_run(n, log_file, transforms=[Halve()])
    try:
        server.run(1)
    finally:
        server.pool.close()
    # the client half ran in the workers, before masking: the unmasked sum is the halved plain sum
    plain = sum(known_delta(str(i), DIM) for i in range(n)) / 2
    assert np.abs(protocol.last_sum - plain).max() <= n * quantum(n)
    calls = stage_calls(log_file)
    assert {stage for stage, _, _ in calls} == set(STAGES)
    homes: dict[str, set[int]] = {}
    for _, cid, pid in calls:
        homes.setdefault(cid, set()).add(pid)
    assert all(len(pids) == 1 for pids in homes.values()), homes  # memory never moved between workers
    used = set().union(*homes.values())
    assert os.getpid() not in used and len(used) == 3


def test_a_stateful_client_half_keeps_the_stages_in_this_process_and_says_why(tmp_path, caplog):
    n, log_file = 6, tmp_path / "calls"
    server, protocol = _secagg_run(n, log_file, transforms=[CountingHalve()])
    with caplog.at_level(logging.WARNING):
        try:
            server.run(1)
        finally:
            server.pool.close()
    assert {pid for _, _, pid in stage_calls(log_file)} == {os.getpid()}
    assert any("counting_halve keeps state" in r.getMessage() for r in caplog.records)
    plain = sum(known_delta(str(i), DIM) for i in range(n)) / 2
    assert np.abs(protocol.last_sum - plain).max() <= n * quantum(n)


def test_a_worker_dying_mid_protocol_costs_only_its_clients(tmp_path):
    n, log_file = 12, tmp_path / "calls"
    server, protocol = _secagg_run(n, log_file, exit_on=(MASKED, "0"))
    try:
        server.run(1)
        calls = stage_calls(log_file)
        dead = next(pid for stage, cid, pid in calls if (stage, cid) == (MASKED, "0"))
        lost = sorted({cid for _, cid, pid in calls if pid == dead})
        failures = server.history.rounds[0].failures
        assert 1 <= len(lost) <= n // 2 and sorted(f.client_id for f in failures) == lost
        assert all("worker process died" in f.reason for f in failures)
        survivors = [str(i) for i in range(n) if str(i) not in lost]
        assert np.abs(protocol.last_sum - sum(known_delta(c, DIM) for c in survivors)).max() <= n * quantum(n)
        server.run(2)  # the worker was replaced: the next round has every client again
        assert not server.history.rounds[1].failures
        assert np.abs(protocol.last_sum - sum(known_delta(str(i), DIM) for i in range(n))).max() <= n * quantum(n)
    finally:
        server.pool.close()


class Both(VectorClient):
    """A vector client that also evaluates like `_Scorer`."""

    def __init__(self, cid: str) -> None:
        super().__init__(cid, DIM)

    evaluate = _Scorer.evaluate


def test_homomorphic_encryption_stages_run_in_the_workers(tmp_path):
    pytest.importorskip("tenseal")
    from fedlearn.he import HEClient, HEConfig, HEProtocol, create_keys

    secret, public = create_keys()
    n, log_file = 4, tmp_path / "calls"
    ids = [str(i) for i in range(n)]
    handlers = recording(HEClient(secret).handlers(), log_file)
    pool = ProcessPool(InProcessPool(lambda cid: VectorClient(cid, DIM), ids, handlers=handlers), 2)
    server = Server(pool, make_strategy("fedavg"), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                    protocol=HEProtocol(HEConfig(), public), anomaly_checks=None)
    try:
        server.run(1)
    finally:
        pool.close()
    expected = sum(known_delta(c, DIM) for c in ids) / n  # equal example counts: the plain mean
    assert np.abs(server.params - expected).max() < 1e-6
    pids = {pid for _, _, pid in stage_calls(log_file)}
    assert os.getpid() not in pids and len(pids) == 2
