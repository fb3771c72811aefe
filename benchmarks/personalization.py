"""Personalisation on naturally split data: per-client accuracy of FedAvg, FedAvg + fine-tuning, FedPer,
FedRep, Ditto and local-only training, each client on its own test split.

    PYTHONPATH=src python benchmarks/personalization.py                 # FEMNIST writers and Shakespeare roles
    PYTHONPATH=src python benchmarks/personalization.py --task femnist --rounds 60

Every method sees the same clients, cohorts (seeded sampler), shuffle seeds, local epochs and initial weights.
After the last round every client (not only a cohort) runs its method's final local adaptation on the final
global model (`PersonalTorchClient.personalize`: FedPer / FedRep retrain their local part on the final body,
Ditto trains its personal model towards the final global one), so a client sampled long ago is not judged
by a stale head. FedAvg + fine-tuning starts from FedAvg's final model and trains on the client's training
split only, with a small lr, choosing 0..--finetune-epochs epochs on a held-out share of that split.
By default the local part of FedPer / FedRep is the output layer's bias (`--local head.bias`): with 62
classes and ~140 samples a writer has one example of most letters, too few to learn a 128x62 head alone,
but enough to learn the writer's class prior. `--local head` keeps the whole layer local instead.
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


def clients(method: str, data: FederatedDataset, model_fn, sgd: dict, args, store_root: Path):
    """The client factory of `method` ("fedavg" or a PersonalTorchClient method)."""
    local = local_part(method, args)
    store = ClientStateStore(store_root / method)

    def client_fn(cid: str) -> TorchClient:
        x, y = data.clients[cid]
        xt, yt = data.client_test[cid]
        common = dict(x_test=xt, y_test=yt, local_epochs=args.epochs, **sgd)
        if method == "fedavg":
            return TorchClient(cid, model_fn, x, y, **common)
        return PersonalTorchClient(cid, model_fn, x, y, store=store, method=method, local=local,
                                   ditto_lambda=args.ditto_lambda, head_epochs=args.head_epochs,
                                   finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                                   finetune_validation=args.finetune_validation, init_seed=args.seed, **common)
    return client_fn


def local_part(method: str, args) -> list[str]:
    return args.local.split(",") if method in ("fedper", "fedrep") else []


def run(method: str, data: FederatedDataset, model_fn, sgd: dict, args, store_root: Path):
    """Train with `method`, run the final local adaptation of every client, and return (final global
    state, client factory)."""
    local = local_part(method, args)
    client_fn = clients(method, data, model_fn, sgd, args, store_root)
    result = fedlearn.run_simulation(client_fn, data.client_ids,
                                     initial_state=shared_state(model_fn, local, seed=args.seed),
                                     strategy=fedlearn.FedAvg(), rounds=args.rounds,
                                     clients_per_round=args.cohort, seed=args.seed, anomaly_checks=None)
    if method in ("fedper", "fedrep", "ditto"):
        for k, cid in enumerate(data.client_ids):  # the final adaptation: a cohort of every client
            client_fn(cid).personalize(result.final_state, {"round": args.rounds + 1, "seed": args.seed + k})
    return result.final_state, client_fn


def local_only(data: FederatedDataset, model_fn, sgd: dict, epochs: int, seed: int) -> dict[str, float]:
    """Each client trains its own model alone; accuracy on its own test split."""
    out = {}
    for k, cid in enumerate(data.client_ids):
        torch.manual_seed(seed)
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
    parser.add_argument("--ditto-lambda", type=float, default=1.0)
    parser.add_argument("--head-epochs", type=int, default=1, help="FedRep's head phase and the final adaptation")
    parser.add_argument("--local", default="head.bias", help="what FedPer / FedRep keep local (comma-separated)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="the most fine-tuning epochs")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-validation", type=float, default=0.2,
                        help="share of a client's training split held out to choose its fine-tuning epochs (0: off)")
    parser.add_argument("--methods", default="fedavg+finetune,fedper,fedrep,ditto,local",
                        help="which rows besides FedAvg (comma-separated)")
    parser.add_argument("--max-clients", type=int, default=60, help="Shakespeare roles (largest first)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("command: PYTHONPATH=src python benchmarks/personalization.py " + " ".join(sys.argv[1:]), flush=True)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    for name in (["femnist", "shakespeare"] if args.task == "both" else [args.task]):
        data, model_fn, sgd = task(name, args.max_clients)
        n = len(data.client_ids)
        print(f"\n{name}: {n} clients, {args.cohort}/round, {args.rounds} rounds, {args.epochs} local epoch(s)")
        print(f"{'method':<18}{'mean':>7}{'p10':>7}{'gain':>7}{'hurt':>7}{'s':>7}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            fedavg_state, fedavg_fn = run("fedavg", data, model_fn, sgd, args, Path(tmp))
            base = per_client_metric(fedavg_fn, data.client_ids, fedavg_state)
            rows = {"fedavg": (base, time.perf_counter() - start)}
            show("fedavg", base, base, rows["fedavg"][1])
            if "fedavg+finetune" in methods:
                start = time.perf_counter()
                ft_fn = clients("finetune", data, model_fn, sgd, args, Path(tmp))
                accs = per_client_metric(ft_fn, data.client_ids, fedavg_state, {"seed": args.seed})
                rows["fedavg+finetune"] = (accs, time.perf_counter() - start)
                show("fedavg+finetune", accs, base, rows["fedavg+finetune"][1])
            for method in ("fedper", "fedrep", "ditto"):
                if method in methods:
                    start = time.perf_counter()
                    state, fn = run(method, data, model_fn, sgd, args, Path(tmp))
                    rows[method] = (per_client_metric(fn, data.client_ids, state), time.perf_counter() - start)
                    show(method, rows[method][0], base, rows[method][1])
            if "local" in methods:
                start = time.perf_counter()
                epochs = max(1, round(args.rounds * args.cohort / n * args.epochs))
                label = f"local-only ({epochs} ep)"
                rows[label] = (local_only(data, model_fn, sgd, epochs, args.seed), time.perf_counter() - start)
                show(label, rows[label][0], base, rows[label][1])
        print("\n| method | mean | p10 | gain vs FedAvg | hurt |\n|---|---|---|---|---|")
        for label, (accs, _) in rows.items():
            r = compare(accs, base)
            print(f"| {label} | {r.mean:.3f} | {r.p10:.3f} | {r.gain:+.3f} | {r.fraction_hurt:.2f} |")


def show(label: str, accs: dict[str, float], base: dict[str, float], seconds: float) -> None:
    """One row of the running table."""
    r = compare(accs, base)
    print(f"{label:<18}{r.mean:>7.3f}{r.p10:>7.3f}{r.gain:>+7.3f}{r.fraction_hurt:>7.2f}{seconds:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
