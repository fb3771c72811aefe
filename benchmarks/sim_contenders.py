"""The contenders of `benchmarks/simulation.py`, each run in a fresh process on one saved workload:

    python -c "import sim_contenders as c; c.main()" CONTENDER WORKLOAD.npz

CONTENDER is `fedlearn-<backend>` (sequential, vectorized, process, ray), `plain` (a PyTorch loop over
clients, no framework: the floor) or `flower` (Flower's simulation runtime on Ray). Every contender trains
the same model from the same initial weights on the same client data, cohorts and per-client shuffle
seeds, all read from the workload file, and evaluates centrally every round. It prints one line,
``RESULT {json}``: when training began and ended (epoch seconds), the seconds of those spent in central
evaluation (the same work for every contender, so training alone can be compared) and the final test accuracy.

Only torch and numpy are imported at the top, so the Flower contender also runs from an environment that
holds flwr but not fedlearn. It is imported as a module (not run as a script) so that Ray, which ships
functions to its workers, finds these functions by name in each worker instead of copying them.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

WORKLOAD_ENV = "FEDLEARN_BENCH_WORKLOAD"


def make_model(task: str) -> nn.Module:
    """digits: MLP 64-64-10 with ReLU; femnist: a small CNN (two 5x5 conv + pool blocks, 62 classes)."""
    if task == "digits":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 62),
    )


@dataclass(frozen=True)
class Workload:
    """Arrays of `workload.npz`: client k's samples are rows starts[k]:starts[k + 1] of x, y; cohorts[r] are
    the client positions trained in round r + 1 and seeds[r, k] client k's shuffle seed in that round."""

    task: str
    client_ids: list[str]
    x: torch.Tensor
    y: torch.Tensor
    starts: np.ndarray
    x_test: torch.Tensor
    y_test: torch.Tensor
    cohorts: np.ndarray
    seeds: np.ndarray
    init: dict[str, torch.Tensor]
    lr: float
    batch_size: int
    epochs: int

    @property
    def rounds(self) -> int:
        return len(self.cohorts)

    def client_data(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[self.starts[k] : self.starts[k + 1]], self.y[self.starts[k] : self.starts[k + 1]]


@functools.lru_cache(maxsize=1)
def load_workload(path: str) -> Workload:
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["param_names"]]
        return Workload(
            task=str(z["task"]), client_ids=[str(c) for c in z["client_ids"]],
            x=torch.from_numpy(z["x"]), y=torch.from_numpy(z["y"]), starts=z["starts"],
            x_test=torch.from_numpy(z["x_test"]), y_test=torch.from_numpy(z["y_test"]),
            cohorts=z["cohorts"], seeds=z["seeds"],
            init={n: torch.from_numpy(z[f"param_{i}"]) for i, n in enumerate(names)},
            lr=float(z["lr"]), batch_size=int(z["batch_size"]), epochs=int(z["epochs"]),
        )


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, w: Workload) -> None:
    """Plain mini-batch SGD: a fresh permutation from the client's seeded generator each epoch."""
    generator = torch.Generator().manual_seed(int(seed))
    params = list(model.parameters())
    model.train()
    for _ in range(w.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), w.batch_size):
            idx = order[start : start + w.batch_size]
            for p in params:
                p.grad = None
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-w.lr)


class EvalClock:
    """Seconds spent inside the wrapped evaluation function."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return run


@torch.no_grad()
def accuracy(model: nn.Module, w: Workload) -> float:
    model.eval()
    return float((model(w.x_test).argmax(1) == w.y_test).float().mean())


def run_plain(w: Workload) -> dict:
    """FedAvg as a user would write it without a framework: one model, clients in turn, a weighted sum."""
    model = make_model(w.task)
    model.load_state_dict(w.init)
    global_params = [p.detach().clone() for p in model.parameters()]
    clock = EvalClock()
    evaluate = clock.timed(accuracy)
    begin = time.time()
    for rnd in range(w.rounds):
        sums = [torch.zeros_like(p, dtype=torch.float64) for p in global_params]
        total = 0
        for k in w.cohorts[rnd]:
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_params):
                    p.copy_(g)
            x, y = w.client_data(int(k))
            local_sgd(model, x, y, w.seeds[rnd, k], w)
            for s, p in zip(sums, model.parameters()):
                s.add_(p.detach().double(), alpha=len(x))
            total += len(x)
        global_params = [(s / total).float() for s in sums]
        with torch.no_grad():
            for p, g in zip(model.parameters(), global_params):
                p.copy_(g)
        acc = evaluate(model, w)
    return {"begin": begin, "end": time.time(), "eval": clock.seconds, "accuracy": acc}


def run_fedlearn(w: Workload, backend: str) -> dict:
    """The same run through fedlearn's round loop on the chosen engine (no anomaly screening: plain FedAvg)."""
    from fedlearn import FedAvg
    from fedlearn.server import ClientSampler, Server
    from fedlearn.simulation.backends import make_pool
    from fedlearn.torch import TorchClient
    from fedlearn.torch.train import central_evaluator

    position = {cid: k for k, cid in enumerate(w.client_ids)}
    model_fn = functools.partial(make_model, w.task)

    def client_fn(cid: str) -> TorchClient:
        x, y = w.client_data(position[cid])
        return TorchClient(cid, model_fn, x, y, batch_size=w.batch_size, lr=w.lr, local_epochs=w.epochs)

    initial = {n: t.numpy() for n, t in w.init.items()}
    pool = make_pool(backend, client_fn, w.client_ids)
    clock = EvalClock()
    server = Server(pool, FedAvg(), initial, sampler=ClientSampler(count=w.cohorts.shape[1], seed=0), seed=0,
                    central_eval=clock.timed(central_evaluator(model_fn, w.x_test.numpy(), w.y_test.numpy())))
    begin = time.time()
    try:
        history = server.run(w.rounds)
    finally:
        pool.close()
    return {"begin": begin, "end": time.time(), "eval": clock.seconds, "accuracy": history.last["test_accuracy"]}


def _flower_train(msg, context):
    """Flower ClientApp `train` handler: it trains the workload client the server named in the message's config
    (the node stands in for that client: every node can read every client's data from the workload file)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    w = load_workload(os.environ[WORKLOAD_ENV])
    k = int(msg.content["config"]["client"])
    rnd = int(msg.content["config"]["server-round"])
    model = make_model(w.task)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = w.client_data(k)
    local_sgd(model, x, y, w.seeds[rnd - 1, k], w)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x)})})
    return Message(content=reply, reply_to=msg)


def run_flower(w: Workload) -> dict:
    """FedAvg on Flower's simulation runtime (Ray backend, one CPU per client task, all cores), on the
    workload's cohorts: Flower's FedAvg samples the round's nodes, and the j-th of them is told to train the
    j-th client of the workload's cohort for that round (same clients, seeds and initial weights as every
    other contender, so the same accuracy up to float rounding)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    class WorkloadCohorts(FedAvg):
        def _construct_messages(self, record, node_ids, message_type):
            config = record[self.configrecord_key]
            cohort = w.cohorts[int(config["server-round"]) - 1]
            if len(node_ids) != len(cohort):
                raise RuntimeError(f"Flower sampled {len(node_ids)} nodes for a cohort of {len(cohort)}")
            return [Message(content=RecordDict({self.arrayrecord_key: record[self.arrayrecord_key],
                                                self.configrecord_key: ConfigRecord({**config, "client": int(k)})}),
                            message_type=message_type, dst_node_id=node)
                    for node, k in zip(node_ids, cohort)]

    times: list[float] = []
    accuracies: list[float] = []
    model = make_model(w.task)

    clock = EvalClock()
    timed_accuracy = clock.timed(accuracy)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        if server_round == 0:  # before training begins: not part of the rounds' time
            accuracies.append(accuracy(model, w))
        else:
            accuracies.append(timed_accuracy(model, w))
        times.append(time.time())  # round 0 comes first: training starts after it
        return MetricRecord({"accuracy": accuracies[-1]})

    client_app = ClientApp()
    client_app.train()(_flower_train)
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        n, cohort = len(w.client_ids), w.cohorts.shape[1]
        strategy = WorkloadCohorts(fraction_train=cohort / n, fraction_evaluate=0.0, min_train_nodes=cohort,
                                   min_evaluate_nodes=0, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(w.init), num_rounds=w.rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(w.client_ids),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False}})
    return {"begin": times[0], "end": times[-1], "eval": clock.seconds, "accuracy": accuracies[-1]}


def main() -> None:
    contender, path = sys.argv[1], sys.argv[2]
    os.environ[WORKLOAD_ENV] = path  # Flower's workers read the workload from here
    w = load_workload(path)
    if contender == "plain":
        result = run_plain(w)
    elif contender == "flower":
        result = run_flower(w)
    elif contender.startswith("fedlearn-"):
        result = run_fedlearn(w, contender.removeprefix("fedlearn-"))
    else:
        raise SystemExit(f"unknown contender {contender!r}")
    print("RESULT " + json.dumps(result), flush=True)
