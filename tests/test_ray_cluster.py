"""A real two-node Ray cluster on this machine, started as the README says, with token authentication on:
the README's command trains on it and ends with the sequential engine's model; clients train on both nodes;
the client data is copied once per node, and each round hands Ray only the state and instructions; a node
killed mid-round costs only its clients' results for that round; a node without the token cannot join.

The tests share one cluster (head: 1 CPU, second node: 2 CPUs, so one node runs two workers) and run in file
order: the last one kills the second node.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlearn import ConfigError, SimulationConfig, simulate
from fedlearn.serialize import decode_state
from fedlearn.simulate import FINAL_MODEL
from fedlearn.simulation.ray_pool import check_ray_address

from ray_cluster import RAY, LocalRayCluster

HERE = Path(__file__).parent


# Every cluster here starts a Ray client server on the same fixed port range (23000+): under pytest-xdist the
# module's tests share one worker (--dist loadgroup), so two module clusters never race for those ports.
pytestmark = pytest.mark.xdist_group("ray_cluster")

@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    nodes = LocalRayCluster()
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_node(num_cpus=2)
        yield nodes
    finally:
        nodes.stop()  # by process group and temp dir: never another Ray on this machine
    assert not nodes.stragglers()


def test_ray_address_forms_users_have_are_accepted_and_others_refused():
    for good in ("auto", "10.0.0.5:6379", "head-1.example.org:6379", "[::1]:6379", "ray://10.0.0.5:10001",
                 "ray://head"):
        assert check_ray_address(good) == good
        SimulationConfig(backend="ray", ray_address=good)
    for bad in ("10.0.0.5", "head:0", "head:65536", "http://head:8265", "ray://", "ray://head:port", "local",
                "head:6379/x", " auto", "-head:6379"):
        with pytest.raises(ConfigError, match="not one Ray can join; give 'auto'"):
            SimulationConfig(backend="ray", ray_address=bad)


@pytest.mark.parametrize("form", ["auto", "ray://"])
def test_readme_cluster_command_with_token_auth_gives_the_sequential_model(cluster, tmp_path, form):
    settings = {"num_clients": 12, "clients_per_round": 6, "rounds": 2, "local_epochs": 1, "eval_clients": 0}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    # the README's command; `auto` finds this cluster through RAY_ADDRESS, the token comes from RAY_AUTH_TOKEN
    address = "auto" if form == "auto" else f"ray://127.0.0.1:{cluster.client_port}"
    run = subprocess.run([sys.executable, "-m", "fedlearn.cli", "simulate", "--backend", "ray", "--ray-address", address,
                          *flags, "--run-dir", str(tmp_path / "run"), "--quiet"],
                         env=cluster.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    remote = decode_state((tmp_path / "run" / FINAL_MODEL).read_bytes())
    reference = simulate(settings).final_state
    assert remote.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(remote[name], value)


def test_a_node_or_driver_without_the_token_is_refused(cluster, tmp_path):
    # right mode, wrong token; two tries at the head instead of twenty, each refused the same way
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64, "RAY_gcs_server_port_wait_time_s": "2"}
    join = subprocess.run([str(RAY), "start", f"--address={cluster.address}", "--num-cpus=1",
                           f"--temp-dir={cluster.root}/intruder", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert join.returncode != 0 and "InvalidAuthToken" in join.stdout + join.stderr
    drive = subprocess.run([sys.executable, "-m", "fedlearn.cli", "simulate", "--backend", "ray", "--ray-address",
                            "auto", "--rounds", "1", "--run-dir", str(tmp_path / "run")],
                           env=env, capture_output=True, text=True, timeout=180)
    assert drive.returncode != 0 and "run with RAY_AUTH_MODE=token and the cluster's token" in drive.stderr
    assert not (tmp_path / "run" / FINAL_MODEL).exists()


def test_both_nodes_train_data_travels_once_per_node_and_a_killed_node_costs_one_round_of_its_clients(
        cluster, tmp_path):
    second = cluster.nodes[1].pid  # `ray start` leads its node's process group
    run = subprocess.run([sys.executable, str(HERE / "ray_driver.py"), str(tmp_path), str(second)],
                         env=cluster.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    head = report["head"]

    def trained(rnd: int) -> dict[str, str]:
        """client -> node, from the markers clients left where they ran"""
        return dict(p.name.split("-")[1:] for p in tmp_path.glob(f"r{rnd}-*"))

    # one worker per CPU: one on the head, two on the second node; clients of both rounds trained on both nodes
    assert report["workers"] == 3 and sorted(report["worker_nodes"]).count(head) == 1
    for rnd in (1, 2):
        assert len(set(trained(rnd).values())) == 2 and len(trained(rnd)) == 8
    assert report["equal_to_sequential"] and report["placement_round_2"] == trained(2)
    # the client data sits once on each node with a worker (two copies for three workers), and a round hands
    # Ray the encoded state once plus the instructions, nothing in proportion to the data
    assert sorted(report["data_nodes"]) == sorted(set(report["worker_nodes"]))
    # ... as the second node's own object store counts it: one copy of the data and two rounds' states
    second_node = next(node for node in report["created_bytes"] if node != head)
    assert report["setup_bytes"] <= report["created_bytes"][second_node] < 1.2 * report["setup_bytes"], report
    assert report["setup_bytes"] > report["data_bytes"]
    state = report["state_bytes"]
    assert all(state < b < state + 2000 for b in report["round_bytes"])
    assert max(report["round_bytes"]) < report["data_bytes"] / 20
    # round 3: the second node was killed while its clients trained; exactly they failed, the head's counted
    rounds = report["rounds"]
    on_head = {c for c, node in trained(3).items() if node == head}
    assert on_head and set(rounds[2]["participants"]) == on_head
    assert rounds[2]["failures"] and not set(rounds[2]["failures"]) & on_head
    assert len(rounds[2]["participants"]) + len(rounds[2]["failures"]) == 8
    # round 4: the whole cohort on the head's worker
    assert len(rounds[3]["participants"]) == 8 and not rounds[3]["failures"]
    assert set(trained(4).values()) == {head} and report["placement_last_round"] == trained(4) and report["finite"]
