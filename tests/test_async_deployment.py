"""The deployment server in asynchronous (FedBuff) mode with real client processes over TLS: a slow client
does not hold back the others, a client that leaves mid-task costs only its task, and a client that joins
mid-run gets work."""
from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from fedlearn import FedAvg, RunStore
from fedlearn.server.async_loop import DRIVER_STATE, AsyncSettings
from fedlearn.transport import DeploymentServer, ServerSettings, certs
from transport_support import fedlearn_process, wait_for


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("async-deploy") / "creds"
    certs.create(out, ["0", "1", "2"])
    return out


def _client(creds, k, port, log, *client_args):
    args = [a for kv in client_args for a in ("--client-arg", kv)]
    return fedlearn_process(["client", "--server", f"127.0.0.1:{port}", "--credentials", str(creds / "clients" / str(k)),
                             "--client-module", "transport_support:make_constant_client", *args], log)


def test_async_deployment_with_clients_joining_and_leaving(tmp_path, creds):
    steps = 8
    settings = ServerSettings(address="127.0.0.1:0", run_dir=str(tmp_path / "run"), certificate=str(creds / "server.pem"),
                              private_key=str(creds / "server.key"), allow_list=str(creds / "allowlist.txt"),
                              round_deadline=60.0, wait_for_clients=2)
    # constant staleness weight: every step adds exactly the clients' +1, whatever the staleness
    server = DeploymentServer({"w": np.zeros(6, np.float32)}, FedAvg(), rounds=steps, settings=settings,
                              anomaly_checks=None, asynchronous=AsyncSettings(buffer_size=2, concurrency=3,
                                                                              staleness="constant"))
    port = server.start()
    marks = tmp_path / "marks"
    marks.mkdir()
    # the fast client pauses in its round-4 task (trained from version 3), so the late client has time to join
    fast = _client(creds, 0, port, tmp_path / "c0.log", "delay=20", "slow_rounds='4'")
    slow = _client(creds, 1, port, tmp_path / "c1.log", f"marker_dir='{marks}'", "delay=120")
    late = None
    result, runner = {}, threading.Thread(target=lambda: result.update(run=server.run()))
    try:
        runner.start()
        wait_for(lambda: (marks / "1-round1").exists(), 60, "the slow client to start its task")
        wait_for(lambda: server.server.step >= 3, 60, "three steps from the fast client alone")
        slow.send_signal(signal.SIGKILL)  # leaves mid-task: its slot must come free at once
        late = _client(creds, 2, port, tmp_path / "c2.log")  # joins mid-run
        runner.join(120)
        assert not runner.is_alive()
        assert [p.wait(30) for p in (fast, late)] == [0, 0]
    finally:
        server.stop(0)
        for p in (fast, slow, late):
            if p is not None:
                p.kill()
    rounds = result["run"].history.rounds
    assert len(rounds) == steps
    assert all(p == "0" for r in rounds[:3] for p in r.participants)  # the slow client held nobody back
    assert rounds[3].participants == ["2", "2"]  # the newcomer's work made step 4 while client 0 paused
    assert any(f.client_id == "1" and f.kind == "drop" for r in rounds for f in r.failures)
    np.testing.assert_allclose(result["run"].final_state["w"], float(steps))
    store = RunStore(tmp_path / "run")
    try:
        assert store.last_round() == steps and store.get_meta(DRIVER_STATE)["executor"]["now"] > 0
    finally:
        store.close()


def test_a_killed_async_server_resumes_its_owed_tasks_and_the_run_completes(tmp_path, creds):
    """`fedlearn server` with [async] (K = 2, concurrency 2) is killed with SIGKILL mid-run while both clients
    are training. The restarted server resumes from its last committed step and sends the owed
    tasks again under their nonces; the clients answer with the results they held (no retraining), and those
    count with their true staleness: every step moves the model by exactly the mean of 1/sqrt(1 + s) over its
    two +1 updates (FedAvg of equal counts, each weighted by the sqrt staleness weight). A step may hold two
    results of one client; `fedlearn audit verify` accepts that. The store is contiguous and `fedlearn audit verify` passes."""
    from fedlearn.cli import main as fedlearn_main
    from test_transport_processes import _last_round
    from transport_support import Deployment

    steps = 10
    run = Deployment(tmp_path, creds, rounds=steps, clients=2,
                     sections="[async]\nbuffer_size = 2\nconcurrency = 2\nmax_staleness = 6")
    try:
        for k, delay in ((0, "1.0"), (1, "1.6")):
            run.honest(k, "--client-arg", f"delay={delay}")
        store_file = tmp_path / "run" / "run.sqlite"

        def committed() -> int:
            return _last_round(tmp_path / "run") if store_file.exists() else 0

        wait_for(lambda: committed() >= 3, 90, "three committed steps")
        run.servers[0].send_signal(signal.SIGKILL)  # both clients are mid-task: their results have nowhere to go
        assert run.servers[0].wait(30) == -signal.SIGKILL
        killed_at = committed()
        wait_for(lambda: all("event=connection_lost" in run.log(f"client{k}") for k in range(2)), 30,
                 "both clients to finish their task and find the server gone")
        run.start_server("server2")
        history, models = run.finish(timeout=120)
    finally:
        run.kill()
    assert f"resumed asynchronous run at step {killed_at}" in run.log("server2")
    resent = sum(run.log(f"client{k}").count("event=result_resent") for k in range(2))
    assert resent >= 1  # held results were answered to the restarted server, not lost
    assert [r.round for r in history] == list(range(1, steps + 1))
    for record, before, after in zip(history, models, models[1:]):
        high = record.metrics["staleness_max"]  # two results: their staleness is high and 2 * mean - high
        low = 2 * record.metrics["staleness_mean"] - high
        assert record.metrics["clients_used"] == 2
        for name in after:
            np.testing.assert_allclose(after[name] - before[name], (1 / np.sqrt(1 + high) + 1 / np.sqrt(1 + low)) / 2,
                                       rtol=1e-5)
    assert any(r.metrics["staleness_max"] >= 1 for r in history[killed_at:])  # resumed results were stale
    assert fedlearn_main(["audit", "verify", str(tmp_path / "run")]) == 0
