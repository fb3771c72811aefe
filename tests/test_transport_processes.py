"""Deployment with real processes on loopback, TLS and authentication on: a 5-client digits run matches the
simulation, a 100 MB model goes through a round, and killed clients, cut connections and a killed server
lose no committed round."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedlearn import FedAvg, RunStore, simulate
from fedlearn.cli import main as fedlearn_main
from fedlearn.transport import DeploymentServer, ServerSettings, certs
from transport_support import TcpProxy, big_state, fedlearn_process, free_port, server_toml, wait_for


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "creds"
    certs.create(out, [str(k) for k in range(5)])
    return out


def _server_config(folder: Path, creds: Path, *, rounds: int, clients: int, port: int, extra: str = "") -> Path:
    (folder / "creds").symlink_to(creds)
    path = folder / "server.toml"
    path.write_text(server_toml(rounds, clients, port=port) + extra)
    return path


def _client(creds: Path, k: int, port: int, log: Path, *data_args: str):
    return fedlearn_process(["client", "--server", f"127.0.0.1:{port}", "--credentials", str(creds / "clients" / str(k)),
                             *data_args], log)


def _constant_client(creds, k, port, log, *client_args):
    args = [a for kv in client_args for a in ("--client-arg", kv)]
    return _client(creds, k, port, log, "--client-module", "transport_support:make_constant_client", *args)


def _finish(processes, timeout):
    for p in processes:
        p.wait(timeout)
    return [p.returncode for p in processes]


def test_five_client_processes_match_the_simulation_on_digits(tmp_path, creds):
    port = free_port()
    config = _server_config(tmp_path, creds, rounds=5, clients=5, port=port)
    server = fedlearn_process(["server", "--config", str(config), "--quiet"], tmp_path / "server.log")
    clients = [_client(creds, k, port, tmp_path / f"client{k}.log", "--dataset", "digits", "--num-clients", "5",
                       "--client-index", str(k)) for k in range(5)]
    try:
        expected = simulate({"seed": 0, "rounds": 5, "dataset": "digits", "num_clients": 5, "clients_per_round": 5,
                             "eval_clients": 0, "local_epochs": 1}).accuracy
        assert _finish([server, *clients], 300) == [0] * 6
    finally:
        for p in [server, *clients]:
            p.kill()
    store = RunStore(tmp_path / "run")
    accuracy = store.history()[-1].metrics["test_accuracy"]
    store.close()
    assert expected > 0.8 and abs(accuracy - expected) <= 0.01
    log = (tmp_path / "server.log").read_text()
    assert "tls=True" in log and "event=round round=5 clients_used=5" in log and "bytes_up=" in log
    assert "event=result client=3 round=5 kind=fit bytes_in=" in (tmp_path / "client3.log").read_text()


def test_killed_server_restarts_from_its_last_committed_round_and_clients_reconnect(tmp_path, creds):
    port = free_port()
    # server momentum is state the restarted server must resume, or the final model comes out different
    config = _server_config(tmp_path, creds, rounds=4, clients=2, port=port,
                            extra='[strategy]\nname = "fedavgm"\nmomentum = 0.9\n')
    first = fedlearn_process(["server", "--config", str(config), "--quiet"], tmp_path / "server1.log")
    clients = [_constant_client(creds, k, port, tmp_path / f"client{k}.log", "delay=0.4") for k in range(2)]
    second = None
    try:
        run_db = tmp_path / "run" / "run.sqlite"
        wait_for(lambda: run_db.exists() and _last_round(tmp_path / "run") >= 2, 60, "round 2 to be committed")
        first.send_signal(signal.SIGKILL)  # mid-round 3: its work is lost, rounds 1-2 are not
        first.wait(10)
        committed = _last_round(tmp_path / "run")
        second = fedlearn_process(["server", "--config", str(config), "--quiet"], tmp_path / "server2.log")
        assert _finish([second, *clients], 60) == [0] * 3
    finally:
        for p in [first, second, *clients]:
            if p is not None:
                p.kill()
    assert f"resumed_at_round={committed}" in (tmp_path / "server2.log").read_text()
    store = RunStore(tmp_path / "run")
    assert [r.round for r in store.history()] == [1, 2, 3, 4]
    assert all(r.participants == ["0", "1"] for r in store.history())
    (initial, _), (final, _) = store.load_round(0), store.load_round(4)
    store.close()
    # The uninterrupted run, by hand: every client's update is +1 everywhere, so the velocity of rounds 1-4 is
    # 1, 1.9, 2.71, 3.439 and the model moves by their sum (a restart that lost the velocity moves 5.8).
    for name in initial:
        np.testing.assert_allclose(final[name], initial[name] + 9.049, atol=1e-5)
    for k in range(2):
        log = (tmp_path / f"client{k}.log").read_text()
        assert "event=connection_lost" in log and log.count("event=registered") == 2 and "is over after round 4" in log


def _last_round(run_dir: Path) -> int:
    store = RunStore(run_dir)
    try:
        return store.last_round() or 0
    finally:
        store.close()


def _deployment(tmp_path, creds, state, *, rounds, deadline=40.0, wait_for_clients=1):
    settings = ServerSettings(address="127.0.0.1:0", run_dir=str(tmp_path / "run"), certificate=str(creds / "server.pem"),
                              private_key=str(creds / "server.key"), allow_list=str(creds / "allowlist.txt"),
                              round_deadline=deadline, wait_for_clients=wait_for_clients)
    return DeploymentServer(state, FedAvg(), rounds=rounds, settings=settings, anomaly_checks=None)


def test_killed_client_does_not_stall_the_round_and_a_cut_client_rejoins(tmp_path, creds, capsys):
    state = {"w": np.zeros((8, 4), np.float32)}
    server = _deployment(tmp_path, creds, state, rounds=4, wait_for_clients=2)
    port = server.start()
    proxy = TcpProxy(port)
    marks = tmp_path / "marks"
    marks.mkdir()
    clients = [
        _constant_client(creds, 0, port, tmp_path / "client0.log", f"marker_dir='{marks}'", "delay=3",
                         "slow_rounds='3'"),
        _constant_client(creds, 1, port, tmp_path / "client1.log", f"marker_dir='{marks}'", "delay=60",
                         "slow_rounds='2'"),
        _constant_client(creds, 2, proxy.port, tmp_path / "client2.log", f"marker_dir='{marks}'", "delay=0.5",
                         "slow_rounds='3'"),
    ]
    result, runner = {}, threading.Thread(target=lambda: result.update(run=server.run()))
    try:
        wait_for(lambda: len(server.pool.connected()) == 3, 60, "three clients to connect")
        runner.start()
        wait_for(lambda: (marks / "1-round2").exists(), 30, "client 1 to start round 2")
        killed_at = time.monotonic()
        clients[1].send_signal(signal.SIGKILL)
        wait_for(lambda: server.server.round >= 2, 30, "round 2 to end without client 1")
        assert time.monotonic() - killed_at < 15  # not the 40 s deadline: the lost connection ends its task
        wait_for(lambda: (marks / "2-round3").exists(), 30, "client 2 to start round 3")
        assert fedlearn_main(["status", "--server", f"127.0.0.1:{port}", "--credentials",
                              str(creds / "clients" / "0")]) == 0
        proxy.cut()  # client 2 loses its connection mid-round and must come back by itself
        runner.join(60)
        assert _finish([clients[0], clients[2]], 30) == [0, 0]
    finally:
        server.stop(0)
        proxy.close()
        for p in clients:
            p.kill()
    status = capsys.readouterr().out
    assert "running, round 2 of 4" in status and "connected clients (2): 0, 2" in status
    rounds = result["run"].history.rounds
    assert rounds[1].participants == ["0", "2"]
    assert any(f.client_id == "1" and f.kind == "drop" and "connection" in f.reason for f in rounds[1].failures)
    assert rounds[2].participants == ["0"] and [f.client_id for f in rounds[2].failures] == ["2"]
    assert rounds[3].participants == ["0", "2"]  # client 2 rejoined
    np.testing.assert_allclose(result["run"].final_state["w"], 4.0)  # four rounds of +1 steps
    log2 = (tmp_path / "client2.log").read_text()
    assert "event=connection_lost" in log2 and log2.count("event=registered") == 2


def test_a_100_megabyte_model_goes_through_a_round(tmp_path, creds):
    state = big_state(100)
    server = _deployment(tmp_path, creds, state, rounds=1, deadline=120)
    port = server.start()
    client = _constant_client(creds, 0, port, tmp_path / "client0.log", "step=0.5")
    try:
        result = server.run()
        assert _finish([client], 30) == [0]
    finally:
        server.stop(0)
        client.kill()
    assert result.history.rounds[0].participants == ["0"]
    assert np.all(result.final_state["embedding"] == 0.5) and np.all(result.final_state["head"] == 0.5)
    stats = server.pool.last_stats["fit"]
    model_bytes = sum(v.nbytes for v in state.values())
    assert model_bytes >= 100 * 2**20
    assert stats.bytes_down >= model_bytes and stats.bytes_up >= model_bytes
