"""Federated LoRA fine-tuning of all-MiniLM-L6-v2 for sentiment on Sent140, one client per Twitter user.

    PYTHONPATH=src python benchmarks/lora.py                  # the table below, ~minutes on 2 cores
    PYTHONPATH=src python benchmarks/lora.py --rounds 5 --min-samples 12   # a quick look

Rows: a linear probe on the frozen encoder (federated, head only), centralised LoRA (all training tweets
pooled, the same number of epochs as a client sees on average... see --central-epochs), federated LoRA
(FedAvg over adapters + head), federated FFA-LoRA (A frozen, only B and the head travel), and federated
LoRA with central DP at epsilon 8 (clip, Gaussian noise, RDP accountant). Columns: test accuracy on the
users' held-out tweets, bytes uploaded per client per round (fedlearn's tensor format) beside the bytes of
the whole model, and seconds per round on this machine. Users with at least --min-samples tweets take part;
each user's tweets are split 80/20 into train and test. Needs ../shared/data/sent140.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SENT140 = HERE.parents[1] / "shared" / "data" / "sent140" / "test.json"
sys.path.insert(0, str(HERE.parent / "src"))

import fedlearn  # noqa: E402
from fedlearn.data import FederatedDataset, load_leaf_json  # noqa: E402
from fedlearn.privacy import PrivacyConfig, build_privacy  # noqa: E402
from fedlearn.serialize import encode_update  # noqa: E402
from fedlearn.server import ClientSampler  # noqa: E402
from fedlearn.torch import TorchClient, central_evaluator, state_of, train_local  # noqa: E402
from fedlearn.torch.lora import LoraModelFactory, pretrained_path  # noqa: E402
from fedlearn.types import Update  # noqa: E402


def sent140(min_samples: int, max_len: int) -> FederatedDataset:
    """Sent140 users with at least `min_samples` tweets, tokenized for MiniLM."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pretrained_path()), local_files_only=True)

    def encode(row: list) -> np.ndarray:
        enc = tok(row[4], padding="max_length", truncation=True, max_length=max_len)
        return np.array([enc["input_ids"], enc["attention_mask"]], dtype=np.int64)

    data = load_leaf_json(SENT140, x_transform=encode, num_classes=2)
    keep = [c for c in data.client_ids if len(data.clients[c][1]) + len(data.client_test[c][1]) >= min_samples]
    test = {c: data.client_test[c] for c in keep}
    return FederatedDataset("sent140", {c: data.clients[c] for c in keep},
                            tuple(np.concatenate([t[k] for t in test.values()]) for k in (0, 1)), 2, test)


def federated(data: FederatedDataset, factory: LoraModelFactory, args, privacy: dict | None = None):
    """FedAvg over the factory's trainable entries; returns (accuracy, upload bytes per client, s per round).
    The test set is evaluated once, after the last round, so seconds per round are training rounds only."""
    def client_fn(cid: str) -> TorchClient:
        x, y = data.clients[cid]
        return TorchClient(cid, factory, x, y, local_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)

    ids = data.client_ids
    init = factory.trainable_state()
    kwargs = {}
    if privacy:
        setup = build_privacy(PrivacyConfig.from_dict(privacy), client_ids=ids, cohort=args.cohort,
                              rounds=args.rounds, strategy=fedlearn.FedAvg(), seed=args.seed)
        kwargs = dict(transforms=setup.transforms, sampler=setup.sampler)
        print("   " + "; ".join(setup.summary), flush=True)
    res = fedlearn.run_simulation(client_fn, ids, initial_state=init, rounds=args.rounds,
                                  clients_per_round=args.cohort, seed=args.seed, anomaly_checks=None, **kwargs)
    accuracy = central_evaluator(factory, *data.test)(res.final_state)["accuracy"]
    return accuracy, upload_bytes(init), res.seconds / args.rounds


def upload_bytes(state: dict) -> int:
    """Bytes of one client's upload for a global state like `state`: its float32 update in fedlearn's format."""
    return len(encode_update(Update("u", 1, np.zeros(sum(v.size for v in state.values()), np.float32), 1)))


def centralised(data: FederatedDataset, factory: LoraModelFactory, args) -> float:
    """LoRA trained on all users' training tweets pooled, `central_epochs` passes; test accuracy."""
    torch.manual_seed(args.seed)
    model = factory()
    x = torch.as_tensor(np.concatenate([data.clients[c][0] for c in data.client_ids]))
    y = torch.as_tensor(np.concatenate([data.clients[c][1] for c in data.client_ids]))
    train_local(model, x, y, epochs=args.central_epochs, batch_size=args.batch_size, lr=args.lr,
                generator=torch.Generator().manual_seed(args.seed))
    return central_evaluator(lambda: model, *data.test)(state_of(model, factory.trainable_state().keys()))["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--central-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--min-samples", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("command: PYTHONPATH=src python benchmarks/lora.py " + " ".join(sys.argv[1:]), flush=True)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = sent140(args.min_samples, args.max_len)
    n_train = sum(len(v[1]) for v in data.clients.values())
    print(f"sent140: {len(data.client_ids)} users, {n_train} training / {len(data.test[1])} test tweets, "
          f"{args.cohort} users per round, {args.rounds} rounds, LoRA rank {args.rank} on query and value")
    lora = LoraModelFactory(2, rank=args.rank)
    full_bytes = upload_bytes(state_of(lora.template))
    print(f"whole model (what FedAvg of all 22M parameters would upload): {full_bytes:,} bytes", flush=True)
    print(f"{'setting':<30}{'accuracy':>9}{'up bytes':>12}{'vs full':>9}{'s/round':>9}")
    rows = []
    start = time.perf_counter()
    rows.append(("centralised LoRA", centralised(data, lora, args), None, time.perf_counter() - start))
    print(f"{'centralised LoRA':<30}{rows[0][1]:>9.3f}{'-':>12}{'':>9}{rows[0][3]:>8.1f}s total", flush=True)
    for label, factory, privacy in [
        ("federated LoRA (FedAvg)", lora, None),
        ("federated FFA-LoRA", LoraModelFactory(2, rank=args.rank, ffa=True), None),
        ("federated linear probe", LoraModelFactory(2, rank=0), None),
        ("federated LoRA, DP eps 8", lora, {"dp_clip": 0.5, "target_epsilon": 8.0, "dp_delta": 1e-4}),
    ]:
        acc, up, sec = federated(data, factory, args, privacy)
        rows.append((label, acc, up, sec))
        print(f"{label:<30}{acc:>9.3f}{up:>12,}{full_bytes / up:>8.0f}x{sec:>9.2f}", flush=True)
    fed = dict((r[0], r[1]) for r in rows)
    print(f"federated LoRA - centralised LoRA: {fed['federated LoRA (FedAvg)'] - fed['centralised LoRA']:+.3f}")


if __name__ == "__main__":
    main()
