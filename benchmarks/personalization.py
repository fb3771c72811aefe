"""Personalisation on naturally split data: per-client accuracy of FedAvg, FedAvg + fine-tuning, FedPer,
FedRep, Ditto and local-only training, each client on its own test split.

    PYTHONPATH=src python benchmarks/personalization.py                 # FEMNIST writers and Shakespeare roles
    PYTHONPATH=src python benchmarks/personalization.py --task femnist --rounds 60

Every method sees the same clients, cohorts (seeded sampler), shuffle seeds, local epochs and initial weights.
Columns: mean per-client accuracy, its 10th percentile, the gain over FedAvg's global model, and the fraction
of clients whose accuracy is lower than under FedAvg's global model (hurt). Local-only trains each client
alone for as many epochs as it would train in the federated runs (its expected participations times the
local epochs, at least one). Needs ../shared/data (FEMNIST npz, tinyshakespeare); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
sys.path.insert(0, str(HERE.parent / "src"))

import fedlearn  # noqa: E402
from fedlearn.data import FederatedDataset, load_femnist_npz, load_shakespeare  # noqa: E402
from fedlearn.personalization import ClientStateStore, PersonalTorchClient, compare, per_client_metric, shared_state  # noqa: E402
from fedlearn.torch import TorchClient  # noqa: E402
from fedlearn.torch.train import evaluate_model, train_local  # noqa: E402


class FemnistCNN(nn.Module):
    """Two 5x5 conv + pool blocks, a hidden layer, and the `head` that FedPer / FedRep keep local."""

    def __init__(self, num_classes: int = 62) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CharModel(nn.Module):
    """Next-character model: embedding, one GRU layer, and the `head` over the vocabulary."""

    def __init__(self, vocab: int, hidden: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(x))
        return self.head(out[:, -1])


def task(name: str, max_clients: int) -> tuple[FederatedDataset, type, dict]:
    """The data, model factory and local-training settings of a task."""
    if name == "femnist":
        data = load_femnist_npz(SHARED / "femnist" / "femnist_leaf_subset.npz")
        return data, lambda: FemnistCNN(data.num_classes), {"batch_size": 16, "lr": 0.1}
    data = load_shakespeare(SHARED / "tinyshakespeare" / "input.txt", max_clients=max_clients)
    return data, lambda: CharModel(data.num_classes), {"batch_size": 32, "lr": 0.5}


def run(method: str, data: FederatedDataset, model_fn, sgd: dict, args, store_root: Path):
    """Train with `method` ("fedavg" or a PersonalTorchClient method) and return (state, client factory)."""
    local = ["head"] if method in ("fedper", "fedrep") else []
    store = ClientStateStore(store_root / method)

    def client_fn(cid: str) -> TorchClient:
        x, y = data.clients[cid]
        xt, yt = data.client_test[cid]
        common = dict(x_test=xt, y_test=yt, local_epochs=args.epochs, **sgd)
        if method == "fedavg":
            return TorchClient(cid, model_fn, x, y, **common)
        return PersonalTorchClient(cid, model_fn, x, y, store=store, method=method, local=local,
                                   ditto_lambda=args.ditto_lambda, finetune_epochs=args.finetune_epochs, **common)

    result = fedlearn.run_simulation(client_fn, data.client_ids, initial_state=shared_state(model_fn, local, seed=0),
                                     strategy=fedlearn.FedAvg(), rounds=args.rounds,
                                     clients_per_round=args.cohort, seed=0, anomaly_checks=None)
    return result.final_state, client_fn


def local_only(data: FederatedDataset, model_fn, sgd: dict, epochs: int) -> dict[str, float]:
    """Each client trains its own model alone; accuracy on its own test split."""
    out = {}
    for k, cid in enumerate(data.client_ids):
        torch.manual_seed(0)
        model = model_fn()
        x, y = (torch.as_tensor(a) for a in data.clients[cid])
        train_local(model, x, y, epochs=epochs, generator=torch.Generator().manual_seed(k), **sgd)
        xt, yt = (torch.as_tensor(a) for a in data.client_test[cid])
        out[cid] = evaluate_model(model, xt, yt)["accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["femnist", "shakespeare", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ditto-lambda", type=float, default=0.1)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--max-clients", type=int, default=60, help="Shakespeare roles (largest first)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in (["femnist", "shakespeare"] if args.task == "both" else [args.task]):
        data, model_fn, sgd = task(name, args.max_clients)
        n = len(data.client_ids)
        print(f"\n{name}: {n} clients, {args.cohort}/round, {args.rounds} rounds, {args.epochs} local epoch(s)")
        print(f"{'method':<18}{'mean':>7}{'p10':>7}{'gain':>7}{'hurt':>7}{'s':>7}")
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            fedavg_state, fedavg_fn = run("fedavg", data, model_fn, sgd, args, Path(tmp))
            base = per_client_metric(fedavg_fn, data.client_ids, fedavg_state)
            rows = {"fedavg": (base, time.perf_counter() - start)}
            start = time.perf_counter()
            ft_store = ClientStateStore(Path(tmp) / "ft")

            def ft_client(cid: str) -> PersonalTorchClient:
                x, y = data.clients[cid]
                xt, yt = data.client_test[cid]
                return PersonalTorchClient(cid, model_fn, x, y, x_test=xt, y_test=yt, store=ft_store,
                                           method="finetune", finetune_epochs=args.finetune_epochs, **sgd)

            rows["fedavg+finetune"] = (per_client_metric(ft_client, data.client_ids, fedavg_state),
                                       time.perf_counter() - start + rows["fedavg"][1])
            for method in ("fedper", "fedrep", "ditto"):
                start = time.perf_counter()
                state, fn = run(method, data, model_fn, sgd, args, Path(tmp))
                rows[method] = (per_client_metric(fn, data.client_ids, state), time.perf_counter() - start)
            start = time.perf_counter()
            epochs = max(1, round(args.rounds * args.cohort / n * args.epochs))
            rows[f"local-only ({epochs} ep)"] = (local_only(data, model_fn, sgd, epochs), time.perf_counter() - start)
        for label, (accs, seconds) in rows.items():
            r = compare(accs, base)
            print(f"{label:<18}{r.mean:>7.3f}{r.p10:>7.3f}{r.gain:>+7.3f}{r.fraction_hurt:>7.2f}{seconds:>7.1f}")


if __name__ == "__main__":
    main()
