"""Ray backend: rounds per second on a one-node Ray cluster vs a two-node one, both started with `ray start`
and token authentication as the README says, next to the sequential engine.

The same two worker CPUs either way: one node with two, or two nodes with one each (both on this machine,
so they share its cores, memory and loopback network: the two-node row measures what spreading over nodes
costs, not what a second machine would add). Workload: digits split over 200 clients (Dirichlet 0.5), 40
sampled per round, MLP 64-64-10, SGD lr 0.05, batch 16, 2 local epochs, FedAvg; the first round (actors
start, the client data reaches each node) is timed apart from the rest. Each driver is a fresh process with
one torch thread.

    PYTHONPATH=src python benchmarks/ray_nodes.py
    PYTHONPATH=src python benchmarks/ray_nodes.py --rounds 10 --clients 1000 --cohort 100
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's throwaway cluster, so both start Ray one way


def child(engine: str, clients: int, cohort: int, rounds: int) -> dict:
    import torch

    from fedlearn import FedAvg
    from fedlearn.data import federate, load_digits
    from fedlearn.server import ClientSampler, Server
    from fedlearn.simulation.backends import make_pool
    from fedlearn.torch import MLP, TorchClient, state_of

    torch.set_num_threads(1)
    data = federate(load_digits(seed=0), "dirichlet", clients, seed=0, alpha=0.5)

    def model_fn() -> torch.nn.Module:
        return MLP(64, 10, hidden=(64,))

    def client_fn(cid: str) -> TorchClient:
        x, y = data.clients[cid]
        return TorchClient(cid, model_fn, x, y, batch_size=16, lr=0.05, local_epochs=2)

    start = time.perf_counter()
    pool = make_pool(engine, client_fn, data.client_ids, ray_address="auto" if engine == "ray" else None)
    torch.manual_seed(0)
    server = Server(pool, FedAvg(), state_of(model_fn()), sampler=ClientSampler(count=cohort, seed=0), seed=0,
                    anomaly_checks=None)
    server.run(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    server.run(rounds)
    rest = time.perf_counter() - start
    pool.close()
    return {"first_round_s": first, "rounds_per_s": (rounds - 1) / rest,
            "train_loss": server.history.rounds[-1].metrics["train_loss"]}


def run_driver(engine: str, args: argparse.Namespace, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", engine, "--clients", str(args.clients), "--cohort",
                          str(args.cohort), "--rounds", str(args.rounds)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--cohort", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.clients, args.cohort, args.rounds)))
        return
    from ray_cluster import LocalRayCluster

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = [("sequential, 1 process", run_driver("sequential", args, env))]
    for label, cpus in (("ray, 1 node x 2 CPUs", [2]), ("ray, 2 nodes x 1 CPU", [1, 1])):
        os.environ.update(env)  # the nodes run fedlearn from this checkout
        cluster = LocalRayCluster()
        try:
            cluster.start_head(cpus[0])
            for n in cpus[1:]:
                cluster.add_node(n)
            rows.append((label, run_driver("ray", args, cluster.env)))
        finally:
            cluster.stop()
    print(f"digits, {args.clients} clients, {args.cohort} per round, {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'engine':<24}{'first round s':>14}{'rounds/s':>10}{'train loss':>12}")
    for label, r in rows:
        print(f"{label:<24}{r['first_round_s']:>14.2f}{r['rounds_per_s']:>10.2f}{r['train_loss']:>12.4f}")
    print(f"Both Ray rows share this machine's {os.cpu_count()} cores (and the driver, raylets and object stores run "
          "on them too); a second node here adds no compute, so compare the rows for overhead, not for speed-up.")


if __name__ == "__main__":
    main()
