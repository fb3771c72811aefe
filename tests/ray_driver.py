"""Driver for the two-node Ray test, run as a script in the cluster's environment (`LocalRayCluster.env`), so
it joins that cluster with its token and nothing of an earlier `ray.init` in the test process leaks in.

    python ray_driver.py OUT_DIR [KILL_PGID]

Clients close over their data here (a closure in `__main__`, as in a user's script), so the data really
travels through Ray's object store. Each client leaves a marker `r<round>-<client>-<node id>` in OUT_DIR when
it trains, which tells the test where it ran without trusting the pool's own bookkeeping. Two rounds on the
cluster are checked against two sequential rounds; with KILL_PGID, round 3 is slowed, the process group of
the node that is not the driver's (the second `ray start`) is killed as soon as one of its clients has
started, and rounds 3 and 4 must still complete. OUT_DIR/report.json holds what the test checks.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fedlearn import FedAvg
from fedlearn.data import federate, load_digits
from fedlearn.serialize import encode_state
from fedlearn.server import ClientSampler, Server
from fedlearn.simulation import InProcessPool
from fedlearn.simulation.ray_pool import RayPool
from fedlearn.torch import MLP, TorchClient, state_of


class MarkedClient(TorchClient):
    """A TorchClient that records where it trained, and dawdles while OUT_DIR/slow exists."""

    out: Path
    driver_pid: int

    def fit(self, params, config):
        import ray

        if os.getpid() != self.driver_pid:  # not the sequential reference run in the driver
            (self.out / f"r{config['round']}-{self.cid}-{ray.get_runtime_context().get_node_id()}").touch()
        if (self.out / "slow").exists():
            time.sleep(1.5)
        return super().fit(params, config)


def _model() -> torch.nn.Module:
    return MLP(64, 10, hidden=(16,))


def _server(pool) -> Server:
    torch.manual_seed(0)
    return Server(pool, FedAvg(), state_of(_model()), sampler=ClientSampler(count=8, seed=2), seed=4,
                  anomaly_checks=None)


def main(out: Path, kill_pgid: int | None) -> dict:
    import ray

    data = federate(load_digits(), "dirichlet", 16, seed=1, alpha=0.5)
    MarkedClient.out, MarkedClient.driver_pid = out, os.getpid()

    def client_fn(cid: str) -> TorchClient:
        x, y = data.clients[cid]
        return MarkedClient(cid, _model, x, y, batch_size=8, lr=0.1, local_epochs=1)

    data_bytes = sum(x.nbytes + y.nbytes for x, y in data.clients.values())
    ray.init(address="auto", log_to_driver=False)  # the pool joins this connection
    before = _created_bytes()
    pool = RayPool(InProcessPool(client_fn, data.client_ids), address="auto")
    head = ray.get_runtime_context().get_node_id()
    report: dict = {"head": head, "workers": pool.size, "data_bytes": data_bytes, "setup_bytes": pool.setup_bytes}
    try:
        server = _server(pool)
        server.run(2)
        report["state_bytes"] = len(encode_state(server.state))
        report["round_bytes"] = list(pool.round_bytes)
        report["placement_round_2"] = dict(pool.placement)
        report["worker_nodes"] = sorted(pool._live.values())
        after = _created_bytes()
        report["created_bytes"] = {node: after[node] - before.get(node, 0) for node in after}
        report["data_nodes"] = sorted(ray.experimental.get_object_locations([pool._local_ref])[pool._local_ref]["node_ids"])
        reference = _server(InProcessPool(client_fn, data.client_ids))
        reference.run(2)
        report["equal_to_sequential"] = bool(np.array_equal(server.params, reference.params))
        if kill_pgid is not None:
            (out / "slow").touch()
            killer = threading.Thread(target=_kill_when_started, args=(out, head, kill_pgid), daemon=True)
            killer.start()
            server.run(3)
            (out / "slow").unlink()
            killer.join()
            server.run(4)
            report["rounds"] = [{"participants": r.participants, "failures": [f.client_id for f in r.failures]}
                                for r in server.history.rounds]
            report["placement_last_round"] = pool.placement
            report["finite"] = bool(np.isfinite(server.params).all())
    finally:
        pool.close()
    return report


def _created_bytes() -> dict[str, int]:
    """Bytes each node's object store has created so far (put there, or pulled from another node), as its
    raylet counts them: Ray's own measure, independent of the pool's."""
    import ray
    from ray._private.internal_api import node_stats

    return {n["NodeID"]: node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False)
            .store_stats.cumulative_created_bytes for n in ray.nodes() if n["Alive"]}


def _kill_when_started(out: Path, head: str, pgid: int) -> None:
    """Kill the other node's processes once one of its clients is training in round 3."""
    deadline = time.monotonic() + 60
    while not any(not p.name.endswith(head) for p in out.glob("r3-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
    (Path(sys.argv[1]) / "report.json").write_text(json.dumps(result))
