"""Privacy benchmarks: what differential privacy costs in accuracy, and what secure aggregation costs in
time and bytes.

(a) Accuracy vs epsilon on digits split IID over 1000 clients (DP-FedAvg, fixed clipping, a cohort of 100
    per round, delta 1e-5); the noise multiplier for each epsilon comes from `noise_for_epsilon`.
(b) One round of secure aggregation (SecAgg+, default sparse graph) for 10, 100 and 500 clients and a
    model of 100k parameters, beside a plain round in the same run: time per client (all its stages), the
    server's time, and bytes each client sends (encoded messages, as on the wire).

    PYTHONPATH=src python benchmarks/privacy.py            # both tables
    PYTHONPATH=src python benchmarks/privacy.py --quick    # fewer rounds and clients, for a smoke run
"""
from __future__ import annotations

import argparse
import math
import time
from collections import OrderedDict, defaultdict

import numpy as np
import torch

from fedlearn import Client, InProcessPool, Update, simulate
from fedlearn.messages import encode_message
from fedlearn.privacy import noise_for_epsilon
from fedlearn.secagg import Identities, SecAggClient, SecAggConfig, SecAggProtocol
from fedlearn.secagg.graph import default_degree
from fedlearn.serialize import encode_update
from fedlearn.server import ClientSampler, Server
from fedlearn.strategies import make_strategy


def accuracy_vs_epsilon(rounds: int, clients: int, cohort: int, seeds: int) -> None:
    print(f"(a) digits, {clients} clients (IID), {cohort} per round, {rounds} rounds, clip 0.5, delta 1e-5, "
          f"logistic regression, mean of {seeds} seeds")
    print(f"{'epsilon':>8} {'noise z':>8} {'accuracy':>9} {'std':>6} {'seconds':>8}")
    for eps in (1.0, 3.0, 8.0, math.inf):
        z = 0.0 if math.isinf(eps) else noise_for_epsilon(eps, rounds, 1e-5, population=clients, cohort=cohort,
                                                          sampling="fixed")
        privacy = {} if math.isinf(eps) else {"dp_clip": 0.5, "dp_noise": z, "epsilon_budget": eps}
        accs, start = [], time.perf_counter()
        for seed in range(seeds):
            result = simulate({"dataset": "digits", "num_clients": clients, "partition": "iid", "model": "logreg",
                               "clients_per_round": cohort, "rounds": rounds, "local_epochs": 1, "batch_size": 2,
                               "lr": 0.1, "eval_clients": 0, "anomaly_checks": False, "seed": seed,
                               "privacy": privacy})
            accs.append(result.accuracy)
        print(f"{eps:>8g} {z:>8.3f} {np.mean(accs):>9.4f} {np.std(accs):>6.3f} {time.perf_counter() - start:>8.1f}")


class RandomUpdateClient(Client):
    """An update of `dim` parameters in [-0.1, 0.1]; no training, so the round measures the protocol alone."""

    def __init__(self, cid: str, dim: int) -> None:
        super().__init__(cid)
        self.dim = dim

    def fit(self, state, config) -> Update:
        delta = np.random.default_rng(int(self.cid)).uniform(-0.1, 0.1, self.dim)
        return Update(self.cid, int(config["round"]), delta, 1)


def _metered(handlers, seconds, sent):
    """Wrap client handlers to add each client's handler time and reply bytes to `seconds` and `sent`
    (the time spent measuring bytes goes to the key "metering", to be left out of the server's time)."""
    def wrap(handler):
        def handle(session, message):
            start = time.perf_counter()
            reply = handler(session, message)
            done = time.perf_counter()
            seconds[session.cid] += done - start
            sent[session.cid] += len(encode_message(reply))
            seconds["metering"] += time.perf_counter() - done
            return reply
        return handle
    return {kind: wrap(h) for kind, h in handlers.items()}


def secagg_cost(sizes: list[int], dim: int) -> None:
    print(f"\n(b) one round, model of {dim} parameters; client time and bytes are per client (mean); a plain update "
          "is sent as float64, a masked one as uint32")
    print(f"{'clients':>7} {'mode':>7} {'degree':>6} {'client s':>9} {'server s':>9} {'sent/client':>12} {'x plain':>8}")
    state = OrderedDict(w=np.zeros(dim, dtype=np.float32))
    for n in sizes:
        ids = [str(i) for i in range(n)]
        plain_pool = InProcessPool(lambda cid: RandomUpdateClient(cid, dim), ids)
        plain = Server(plain_pool, make_strategy("fedavg"), state, sampler=ClientSampler(fraction=1.0), anomaly_checks=None)
        start = time.perf_counter()
        plain.run_round(1)
        plain_total = time.perf_counter() - start
        plain_bytes = len(encode_update(RandomUpdateClient("0", dim).fit(state, {"round": 1})))
        fit_start = time.perf_counter()
        for cid in ids:
            RandomUpdateClient(cid, dim).fit(state, {"round": 1})
        plain_client = (time.perf_counter() - fit_start) / n
        print(f"{n:>7} {'plain':>7} {'-':>6} {plain_client:>9.4f} {plain_total - plain_client * n:>9.3f} "
              f"{plain_bytes:>12,} {1.0:>8.2f}")

        identities = Identities.generate(ids)
        seconds, sent = defaultdict(float), defaultdict(int)
        handlers = _metered(SecAggClient(identities.sign, identities.registry).handlers(), seconds, sent)
        config = SecAggConfig(clip_range=0.1)
        protocol = SecAggProtocol(config, identities.registry)
        pool = InProcessPool(lambda cid: RandomUpdateClient(cid, dim), ids, handlers=handlers)
        server = Server(pool, make_strategy("fedavg"), state, sampler=ClientSampler(fraction=1.0), protocol=protocol,
                        anomaly_checks=None)
        start = time.perf_counter()
        server.run_round(1)
        total = time.perf_counter() - start
        metering = seconds.pop("metering")
        client_time = sum(seconds.values()) / n
        mean_sent = sum(sent.values()) / n
        print(f"{n:>7} {'secagg':>7} {default_degree(n):>6} {client_time:>9.4f} {total - sum(seconds.values()) - metering:>9.3f} "
              f"{mean_sent:>12,.0f} {mean_sent / plain_bytes:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast version of both tables")
    parser.add_argument("--only", choices=("accuracy", "secagg"), help="run one table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is ~10x faster than many contending for 2 cores
    if args.only != "secagg":
        accuracy_vs_epsilon(rounds=20 if args.quick else 100, clients=1000, cohort=100, seeds=1 if args.quick else 3)
    if args.only != "accuracy":
        secagg_cost([10, 100] if args.quick else [10, 100, 500], dim=100_000)


if __name__ == "__main__":
    main()
