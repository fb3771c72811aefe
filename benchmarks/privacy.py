"""Privacy benchmarks: what differential privacy costs in accuracy, and what secure aggregation costs in
time and bytes.

(a) Accuracy vs epsilon on digits split IID over 1000 clients (DP-FedAvg, fixed clipping, a cohort of 100
    per round, delta 1e-5); the noise multiplier for each epsilon comes from `noise_for_epsilon`.
(b) One round of each aggregation protocol (plain, SecAgg+ with its default sparse graph, full SecAgg, and
    CKKS HE) for 10 and 100 clients and a model of 100k parameters: time per client (all its stages), the
    server's time, and bytes each client sends and receives (encoded messages, as on the wire).

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


def _metered(handlers, seconds, sent, received):
    """Wrap client handlers to add each client's handler time, reply bytes and request bytes (encoded messages,
    as on the wire) to `seconds`, `sent` and `received` (the time spent measuring bytes goes to the key
    "metering", to be left out of the server's time)."""
    def wrap(handler):
        def handle(session, message):
            start = time.perf_counter()
            reply = handler(session, message)
            done = time.perf_counter()
            seconds[session.cid] += done - start
            sent[session.cid] += len(encode_message(reply))
            received[session.cid] += len(encode_message(message))
            seconds["metering"] += time.perf_counter() - done
            return reply
        return handle
    return {kind: wrap(h) for kind, h in handlers.items()}


def _protocols(ids: list[str]):
    """(mode, degree, client handlers, round protocol) of each aggregation mode measured."""
    identities = Identities.generate(ids)
    secagg = SecAggClient(identities.sign, identities.registry).handlers()
    sparse = SecAggConfig(clip_range=0.1)
    yield "secagg+", str(default_degree(len(ids))), secagg, SecAggProtocol(sparse, identities.registry)
    yield "secagg", "full", secagg, SecAggProtocol(SecAggConfig(clip_range=0.1, graph="full"), identities.registry)
    try:
        from fedlearn.he import HEClient, HEConfig, HEProtocol, create_keys
    except ImportError:
        print("(HE skipped: pip install -e '.[he]')")
        return
    secret, public = create_keys()
    yield "he", "-", HEClient(secret).handlers(), HEProtocol(HEConfig(), public)


def protocol_cost(sizes: list[int], dim: int) -> None:
    print(f"\n(b) one round, model of {dim} parameters: seconds per client (mean, all its stages; training is a "
          "random vector) and for the server; bytes each client sends and receives besides the model (encoded "
          "messages; a plain update is float64)")
    print(f"{'clients':>7} {'mode':>8} {'degree':>6} {'client s':>9} {'server s':>9} {'sent/client':>12} "
          f"{'recv/client':>12} {'x plain':>8}")
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
        print(f"{n:>7} {'plain':>8} {'-':>6} {plain_client:>9.4f} {plain_total - plain_client * n:>9.3f} "
              f"{plain_bytes:>12,} {0:>12,} {1.0:>8.2f}")
        for mode, degree, handlers, protocol in _protocols(ids):
            seconds, sent, received = defaultdict(float), defaultdict(int), defaultdict(int)
            pool = InProcessPool(lambda cid: RandomUpdateClient(cid, dim), ids,
                                 handlers=_metered(handlers, seconds, sent, received))
            server = Server(pool, make_strategy("fedavg"), state, sampler=ClientSampler(fraction=1.0),
                            protocol=protocol, anomaly_checks=None)
            start = time.perf_counter()
            record = server.run_round(1)
            total = time.perf_counter() - start
            if record.note:
                print(f"{n:>7} {mode:>8} round failed: {record.note}")
                continue
            metering = seconds.pop("metering")
            mean_sent = sum(sent.values()) / n
            print(f"{n:>7} {mode:>8} {degree:>6} {sum(seconds.values()) / n:>9.4f} "
                  f"{total - sum(seconds.values()) - metering:>9.3f} {mean_sent:>12,.0f} "
                  f"{sum(received.values()) / n:>12,.0f} {mean_sent / plain_bytes:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast version of both tables")
    parser.add_argument("--only", choices=("accuracy", "protocols"), help="run one table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is ~10x faster than many contending for 2 cores
    if args.only != "protocols":
        accuracy_vs_epsilon(rounds=20 if args.quick else 100, clients=1000, cohort=100, seeds=1 if args.quick else 3)
    if args.only != "accuracy":
        protocol_cost([10] if args.quick else [10, 100], dim=100_000)


if __name__ == "__main__":
    main()
