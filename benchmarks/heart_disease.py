"""Fed-Heart-Disease: strategies on the four UCI hospitals, set beside FLamby's published table.

Each hospital is a client holding its FLamby training split; the model is logistic regression (FLamby's
baseline; here as a two-class softmax, the same model family). The score is FLamby's: test accuracy on each
hospital's own test split, averaged over the four hospitals, then mean and std over seeds. "pooled" trains
the same model centrally on all training rows with the same number of passes over the data.

    PYTHONPATH=src python benchmarks/heart_disease.py [--normalization federated|hospital|global] [--secure]

Two tables by default, one per standardisation of the features. "hospital" is FLamby's: each hospital uses
its own training mean and std, which removes the differences between hospitals' patient populations, and
caps even a fully trained pooled model near 0.71 here. "federated" uses the mean and std of all hospitals'
training rows, computed by federated statistics (`fedlearn.simulate_statistics`: each hospital sends only its
count, mean and sum of squared deviations; with --secure, sums of clipped z-scores under secure aggregation
over the declared bounds below), so no pooled data is needed. "global" computes the same statistics from
the pooled rows, as a check that the federated ones change nothing.

Needs the UCI files in ../shared/data/heart_disease (or --data DIR); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedlearn.analytics import simulate_statistics
from fedlearn.data import FederatedDataset, load_heart_disease
from fedlearn.simulate import run_simulation
from fedlearn.strategies import make_strategy
from fedlearn.torch import LogisticRegression, TorchClient, load_state, state_of
from fedlearn.torch.train import evaluate_model, train_local
from fedlearn.types import State

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "heart_disease"
FLAMBY = {"pooled": 0.735, "fedavg": 0.685, "fedyogi": 0.731}  # FLamby (2022), mean per-client accuracy, 5 seeds
PARAMS = {  # strategy -> parameters; FedProx, FedYogi and FedAdam as FLamby tuned them for this data set
    "fedavg": {},
    "fedprox": {"mu": 0.01},
    "fedyogi": {"server_lr": 0.01, "tau": 1e-8, "beta2": 0.999},
    "scaffold": {},
    "fedadam": {"server_lr": 0.01, "tau": 1e-8, "beta2": 0.999},
    "fedavgm": {"momentum": 0.9, "server_lr": 0.1},
    "fednova": {},
}

# declared feature bounds for --secure, in the loader's column order: age, sex, resting blood pressure,
# cholesterol, fasting blood sugar, max heart rate, exercise angina, ST depression, then 5 one-hot columns
BOUNDS = [(0, 120), (0, 1), (0, 300), (0, 700), (0, 1), (0, 250), (0, 1), (-5, 10)] + [(0, 1)] * 5


def model_fn() -> torch.nn.Module:
    return LogisticRegression(13, 2)


def per_client_accuracy(data: FederatedDataset, state: State) -> list[float]:
    """Accuracy of `state` on each hospital's own test split."""
    model = model_fn()
    load_state(model, state)
    return [evaluate_model(model, torch.as_tensor(x), torch.as_tensor(y))["accuracy"]
            for x, y in data.client_test.values()]


def federated(name: str, data: FederatedDataset, seed: int, args: argparse.Namespace) -> list[float]:
    def client_fn(cid: str) -> TorchClient:
        return TorchClient(cid, model_fn, *data.clients[cid], local_epochs=args.local_epochs,
                           batch_size=args.batch_size, lr=args.lr)

    result = run_simulation(client_fn, data.client_ids, model_fn, strategy=make_strategy(name, **PARAMS[name]),
                            rounds=args.rounds, seed=seed)
    return per_client_accuracy(data, result.final_state)


def pooled(data: FederatedDataset, seed: int, args: argparse.Namespace) -> list[float]:
    torch.manual_seed(seed)
    model = model_fn()
    x = torch.as_tensor(np.concatenate([x for x, _ in data.clients.values()]))
    y = torch.as_tensor(np.concatenate([y for _, y in data.clients.values()]))
    train_local(model, x, y, epochs=args.rounds * args.local_epochs, batch_size=args.batch_size, lr=args.lr,
                generator=torch.Generator().manual_seed(seed))
    return per_client_accuracy(data, state_of(model))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with processed.*.data")
    parser.add_argument("--normalization", choices=["federated", "hospital", "global"], nargs="+",
                        default=["federated", "hospital"])
    parser.add_argument("--secure", action="store_true",
                        help="federated statistics under secure aggregation (sums over declared bounds)")
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedyogi", "scaffold"],
                        choices=sorted(PARAMS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 13-feature model: extra threads only contend with each other

    for normalization in args.normalization:
        table(load(args, normalization), normalization, args)


def load(args: argparse.Namespace, normalization: str) -> FederatedDataset:
    """The hospitals' data, standardised as `normalization` says; "federated" by federated statistics."""
    if normalization != "federated":
        return load_heart_disease(args.data, normalization)
    raw = load_heart_disease(args.data, "none")
    stats = simulate_statistics(raw, features=13, bins=0, secure=args.secure,
                                **({"bounds": BOUNDS, "max_rows": 1000} if args.secure else {}))
    print(f"\nfederated statistics: {stats.count:.0f} training rows of {len(stats.clients)} hospitals, "
          f"{stats.exchanges} exchange(s), secure aggregation {'on' if stats.secure else 'off'}; "
          f"mean age {stats.mean[0]:.2f}, std {stats.std[0]:.2f}")
    return stats.standardizer().apply(raw)


def table(data: FederatedDataset, normalization: str, args: argparse.Namespace) -> None:
    print(f"\nFed-Heart-Disease, {normalization} standardisation: {args.rounds} rounds x {args.local_epochs} "
          f"local epoch(s), batch {args.batch_size}, client lr {args.lr}, seeds 0-{args.seeds - 1}")
    print(f"{'method':<10} {'accuracy':>16} {'per hospital (' + ', '.join(data.client_ids) + ')':>48} "
          f"{'FLamby':>7} {'seconds':>8}")
    for name in ["pooled", *args.strategies]:
        start = time.perf_counter()
        runs = np.array([pooled(data, s, args) if name == "pooled" else federated(name, data, s, args)
                         for s in range(args.seeds)])
        means = runs.mean(axis=1)
        flamby = f"{FLAMBY[name]:.3f}" if name in FLAMBY else "-"
        hospitals = ", ".join(f"{a:.3f}" for a in runs.mean(axis=0))
        print(f"{name:<10} {means.mean():>8.3f} ± {means.std():.3f} {hospitals:>48} {flamby:>7} "
              f"{time.perf_counter() - start:>8.1f}")


if __name__ == "__main__":
    main()
