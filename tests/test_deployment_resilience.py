"""A deployment outlives its failures, with real `fedlearn server` / `fedlearn client` processes on loopback:
a server that stops before the run completed does not tell its clients the run is over, so they keep
reconnecting until it is restarted and resumes; and a client gone for good does not stop the run when
`min_clients` are still connected."""
from __future__ import annotations

import signal
import time

import pytest

from fedlearn.cli import main as fedlearn_main
from fedlearn.transport import certs
from transport_support import Deployment, wait_for
from test_transport_processes import _last_round


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("resilience") / "creds"
    certs.create(out, [str(k) for k in range(3)])
    return out


def test_an_interrupted_server_does_not_end_the_clients_and_a_restart_resumes_with_them(tmp_path, creds):
    run = Deployment(tmp_path, creds, rounds=4, clients=2)
    try:
        clients = [run.honest(k, "--client-arg", "delay=0.4") for k in range(2)]
        wait_for(lambda: (tmp_path / "run" / "run.sqlite").exists() and _last_round(tmp_path / "run") >= 2, 60,
                 "round 2 to be committed")
        run.servers[0].send_signal(signal.SIGINT)  # its `finally` used to send Finished: the clients exited
        assert run.servers[0].wait(30) == 130
        time.sleep(2)  # long enough for a client told "the run is over" to have exited
        assert [c.poll() for c in clients] == [None, None]
        for k in range(2):
            log = run.log(f"client{k}")
            assert "event=connection_lost" in log and "is over" not in log
        run.start_server("server2")
        history, _ = run.finish()
    finally:
        run.kill()
    assert "Connected clients keep trying to reconnect" in run.log("server")
    assert "resumed_at_round=" in run.log("server2")
    assert [r.round for r in history] == [1, 2, 3, 4] and all(r.participants == ["0", "1"] for r in history)
    for k in range(2):
        log = run.log(f"client{k}")
        assert log.count("event=registered") == 2 and log.count("is over after round 4") == 2  # log + "done:"


def test_a_client_gone_for_good_does_not_stop_the_run_when_min_clients_are_connected(tmp_path, creds, capsys):
    """clients_per_round = 3, min_clients = 2, and client 2 never comes: each round waits proceed_after = 4 s
    for it, saying so in the log and in `fedlearn status`, then goes on with clients 0 and 1."""
    run = Deployment(tmp_path, creds, rounds=2, clients=3, sampling="min_clients = 2", server="proceed_after = 4")
    try:
        for k in range(2):
            run.honest(k)
        wait_for(lambda: "event=waiting_for_clients connected=2 wanted=3" in run.log("server"), 60,
                 "the server to wait with two of three clients")
        assert fedlearn_main(["status", "--server", f"127.0.0.1:{run.port}", "--credentials",
                              str(creds / "clients" / "0")]) == 0
        history, _ = run.finish()
    finally:
        run.kill()
    assert "waiting for clients: 2 of 3 connected" in capsys.readouterr().out
    assert [r.participants for r in history] == [["0", "1"], ["0", "1"]]
    log = run.log("server")
    assert log.count("event=proceeding connected=2 wanted=3") == 2 and "proceeding_in=" in log
