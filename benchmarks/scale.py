"""Scale: peak memory of one simulation at 1k, 10k and 100k clients, which should follow the cohort sampled
per round, not the number of clients.

Clients are made on demand by `client_fn(cid)`: client k holds 8 + k % 25 digits samples drawn by a
generator seeded with k from one shared pool (as a real `client_fn` would open client k's file), so nothing
per client exists outside the round that samples it. MLP 64-64-10, SGD lr 0.05, batch 16, 1 local epoch,
FedAvg, central evaluation every round. Each run is a fresh process (one torch thread); peak RSS is that
process's maximum resident set (getrusage).

    PYTHONPATH=src python benchmarks/scale.py
    PYTHONPATH=src python benchmarks/scale.py --clients 1000 10000 --cohorts 100 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def child(num_clients: int, cohort: int, engine: str, rounds: int) -> dict:
    import numpy as np
    import torch

    from fedlearn import FedAvg
    from fedlearn.data import load_digits
    from fedlearn.server import ClientSampler, Server
    from fedlearn.simulation.backends import make_pool
    from fedlearn.torch import MLP, TorchClient, state_of
    from fedlearn.torch.train import central_evaluator

    data = load_digits(seed=0)

    def model_fn() -> torch.nn.Module:
        return MLP(64, 10, hidden=(64,))

    def client_fn(cid: str) -> TorchClient:
        k = int(cid)
        rows = np.random.default_rng(k).choice(len(data.y_train), size=8 + k % 25, replace=False)
        return TorchClient(cid, model_fn, data.x_train[rows], data.y_train[rows], batch_size=16, lr=0.05,
                           local_epochs=1)

    torch.manual_seed(0)
    pool = make_pool(engine, client_fn, [str(k) for k in range(num_clients)])
    server = Server(pool, FedAvg(), state_of(model_fn()), sampler=ClientSampler(count=cohort, seed=0), seed=0,
                    central_eval=central_evaluator(model_fn, data.x_test, data.y_test))
    start = time.perf_counter()
    history = server.run(rounds)
    pool.close()
    return {"seconds_per_round": (time.perf_counter() - start) / rounds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "accuracy": history.last["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[1000, 10_000, 100_000])
    parser.add_argument("--cohorts", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--engines", nargs="*", default=["sequential", "vectorized"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("CLIENTS", "COHORT", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, cohort, engine = args.child
        print(json.dumps(child(int(n), int(cohort), engine, args.rounds)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    print(f"{'clients':>8}{'cohort':>8}  {'engine':<12}{'peak RSS MiB':>13}{'s/round':>9}{'accuracy':>10}")
    for n in args.clients:
        for cohort in args.cohorts:
            for engine in args.engines:
                out = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--child", str(n),
                                      str(cohort), engine], capture_output=True, text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{n:>8}{cohort:>8}  {engine:<12}{r['peak_rss_mib']:>13.0f}{r['seconds_per_round']:>9.3f}"
                      f"{r['accuracy']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
