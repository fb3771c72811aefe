"""Scale: peak memory of one simulation at 1k, 10k and 100k clients, which should follow the cohort sampled
per round, not the number of clients.

Clients are made on demand by `client_fn(cid)`: client k holds 8 + k % 25 digits samples drawn by a
generator seeded with k from one shared pool (as a real `client_fn` would open client k's file), so nothing
per client exists outside the round that samples it. MLP 64-64-10, SGD lr 0.05, batch 16, 1 local epoch,
FedAvg, central evaluation every round. Each run is a fresh process (one torch thread); peak RSS is that
process's maximum resident set (getrusage).

    PYTHONPATH=src python benchmarks/scale.py
    PYTHONPATH=src python benchmarks/scale.py --clients 1000 10000 --cohorts 100 --rounds 2

`--aggregation` prints the server's peak memory during one round of a 100M-parameter model (`--params`) at
10, 50 and 200 clients per round (`--per-round`): the weighted mean folds each update into a running mean as
it arrives (flat), the coordinate median keeps every update of the round (growing with the cohort). Clients
are cheap fakes (each update a constant vector made on demand in this process), so what grows is the
server's own holding. Each row is a fresh process; "traced" is the peak of tracemalloc (numpy reports its
buffers to it) during the round above what was allocated before it (the model), "RSS" the process's peak
resident set. A median row whose estimate (3 n d 8 bytes: the updates, their stack, the median's sorted
copy) exceeds `--max-gib` is not run and says so.

    PYTHONPATH=src python benchmarks/scale.py --aggregation
    PYTHONPATH=src python benchmarks/scale.py --aggregation --params 1000000
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


def aggregation_child(params: int, per_round: int, aggregator: str) -> dict:
    """Peak memory of one round of `per_round` fake clients with `params` parameters under `aggregator`."""
    import tracemalloc
    from collections import OrderedDict

    import numpy as np

    from fedlearn import Client, InProcessPool, Update
    from fedlearn.aggregators import make_aggregator
    from fedlearn.server import ClientSampler, Server
    from fedlearn.strategies.base import Strategy
    from fedlearn.strategies.fedavg import ServerSGD

    class FakeClient(Client):
        def fit(self, state, config):  # noqa: ANN001, ANN202 - a cheap stand-in for local training
            return Update(self.cid, int(config["round"]), np.full(params, 1e-3 * (1 + int(self.cid))), 10, {})

    pool = InProcessPool(FakeClient, [str(k) for k in range(per_round)])
    server = Server(pool, Strategy(make_aggregator(aggregator), ServerSGD()), OrderedDict(w=np.zeros(params)),
                    sampler=ClientSampler(count=per_round, seed=0))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    server.run_round(1)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"traced_mib": (peak - before) / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "mode": "stacked" if server.stacking_reason else "streaming"}


def aggregation_table(args: argparse.Namespace, env: dict) -> None:
    model_mib = args.params * 8 / 2**20
    print(f"server memory for one round, {args.params:,} parameters (one float64 update = {model_mib:,.0f} MiB)")
    print(f"{'aggregator':<12}{'clients':>8}  {'mode':<10}{'traced MiB':>12}{'peak RSS MiB':>14}{'s/round':>9}")
    for aggregator in ("mean", "median"):
        for n in args.per_round:
            estimate = 3 * n * args.params * 8 / 2**30  # the updates, their stack, the median's sorted copy
            if aggregator == "median" and estimate > args.max_gib:
                print(f"{aggregator:<12}{n:>8}  {'stacked':<10}  not run: needs about {estimate:,.0f} GiB "
                      f"(> --max-gib {args.max_gib:g})", flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, "--aggregation-child", str(args.params), str(n),
                                  aggregator], capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{aggregator:<12}{n:>8}  {r['mode']:<10}{r['traced_mib']:>12,.0f}{r['peak_rss_mib']:>14,.0f}"
                  f"{r['seconds']:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[1000, 10_000, 100_000])
    parser.add_argument("--cohorts", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--engines", nargs="*", default=["sequential", "vectorized"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("CLIENTS", "COHORT", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--aggregation", action="store_true", help="server memory of streaming vs stacked rounds")
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--per-round", type=int, nargs="*", default=[10, 50, 200])
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip median rows estimated above this")
    parser.add_argument("--aggregation-child", nargs=3, metavar=("PARAMS", "CLIENTS", "AGGREGATOR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aggregation_child:
        params, n, aggregator = args.aggregation_child
        print(json.dumps(aggregation_child(int(params), int(n), aggregator)))
        return
    if args.child:
        n, cohort, engine = args.child
        print(json.dumps(child(int(n), int(cohort), engine, args.rounds)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    if args.aggregation:
        aggregation_table(args, env)
        return
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
