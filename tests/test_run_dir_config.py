"""A run directory belongs to one configuration, whichever front door started it (CLI flags, TOML, the
Python API, a deployment server): another configuration is refused naming what differs, and resuming may
raise only `rounds`."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlearn import FedAvg, RunDirConflict, RunStore, run_simulation
from fedlearn.cli import main
from fedlearn.transport import DeploymentServer, ServerSettings, certs
from transport_support import ConstantClient

QUICK = ["--num-clients", "10", "--clients-per-round", "3", "--local-epochs", "1", "--eval-clients", "0",
         "--model", "logreg", "--quiet"]


def _stored(run_dir):
    store = RunStore(run_dir)
    try:
        return store.get_meta("config"), [r.round for r in store.history()]
    finally:
        store.close()


def test_the_cli_refuses_another_configuration_and_resume_may_raise_only_rounds(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["simulate", "--rounds", "2", "--run-dir", str(run), *QUICK]) == 0
    capsys.readouterr()
    assert main(["simulate", "--rounds", "3", "--strategy", "fedyogi", "--run-dir", str(run), *QUICK]) == 2
    error = capsys.readouterr().err
    assert "belongs to another configuration" in error and "strategy (stored 'fedavg', given 'fedyogi')" in error
    assert "rounds (stored 2, given 3)" in error and f"--resume {run}" in error
    toml = tmp_path / "lr.toml"
    toml.write_text("[client]\nlr = 0.05\n")
    assert main(["simulate", "--config", str(toml), "--rounds", "2", "--run-dir", str(run), *QUICK]) == 2
    assert "lr (stored 0.1, given 0.05)" in capsys.readouterr().err
    config, rounds = _stored(run)
    assert config["strategy"] == "fedavg" and config["rounds"] == 2 and rounds == [1, 2]

    assert main(["simulate", "--resume", str(run), "--strategy", "fedyogi", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "strategy (stored 'fedavg', given 'fedyogi')" in error and "change nothing but rounds" in error
    assert main(["simulate", "--resume", str(run), "--rounds", "1", "--quiet"]) == 2
    assert "2 rounds are already committed" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(run), "--rounds", "3", "--quiet"]) == 0
    config, rounds = _stored(run)
    assert config["rounds"] == 3 and rounds == [1, 2, 3]


def _constant(cid: str) -> ConstantClient:
    return ConstantClient(cid, step=1.0)


def test_the_python_api_stores_its_configuration_and_resumes_only_for_more_rounds(tmp_path):
    state = OrderedDict(w=np.zeros(4))
    ids = ["0", "1", "2"]
    first = run_simulation(_constant, ids, initial_state=state, rounds=2, run_dir=tmp_path, anomaly_checks=None)
    config, _ = _stored(tmp_path)
    assert config["strategy"]["class"] == "FedAvg" and config["clients"] == ids and config["rounds"] == 2
    with pytest.raises(RunDirConflict, match=r"strategy\.server_optimizer\.lr \(stored 1\.0, given 0\.5\)"):
        run_simulation(_constant, ids, initial_state=state, strategy=FedAvg(server_lr=0.5), rounds=2,
                       run_dir=tmp_path, anomaly_checks=None)
    with pytest.raises(RunDirConflict, match=r"model\.w \(stored \[\[4\], '<f8'\], given \[\[5\], '<f8'\]\)"):
        run_simulation(_constant, ids, initial_state=OrderedDict(w=np.zeros(5)), rounds=2, run_dir=tmp_path,
                       anomaly_checks=None)
    with pytest.raises(RunDirConflict, match=r"rounds \(stored 2, given 4\)"):
        run_simulation(_constant, ids, initial_state=state, rounds=4, run_dir=tmp_path, anomaly_checks=None)
    more = run_simulation(_constant, ids, initial_state=state, rounds=4, run_dir=tmp_path, anomaly_checks=None,
                          resume=True)
    np.testing.assert_array_equal(first.final_state["w"], 2.0)
    np.testing.assert_array_equal(more.final_state["w"], 4.0)  # two more rounds of +1 from the stored model
    assert [r.round for r in more.history.rounds] == [1, 2, 3, 4]


def test_a_deployment_server_refuses_a_run_directory_of_another_configuration(tmp_path):
    creds = tmp_path / "creds"
    certs.create(creds, ["0"])
    settings = ServerSettings(address="127.0.0.1:0", run_dir=str(tmp_path / "run"),
                              certificate=str(creds / "server.pem"), private_key=str(creds / "server.key"),
                              allow_list=str(creds / "allowlist.txt"))
    state = OrderedDict(w=np.zeros(3, np.float32))
    DeploymentServer(state, FedAvg(), rounds=3, settings=settings).stop(0)
    with pytest.raises(RunDirConflict, match=r"strategy\.server_optimizer\.lr \(stored 1\.0, given 0\.5\)"):
        DeploymentServer(state, FedAvg(server_lr=0.5), rounds=3, settings=settings)
    with pytest.raises(RunDirConflict, match=r"rounds \(stored 3, given 5\)"):
        DeploymentServer(state, FedAvg(), rounds=5, settings=settings)
    server = DeploymentServer(state, FedAvg(), rounds=5, settings=settings, resume=True)
    server.stop(0)
    assert _stored(tmp_path / "run")[0]["rounds"] == 5
