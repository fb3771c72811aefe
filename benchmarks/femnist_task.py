"""The FEMNIST writers workload shared by the asynchronous and compression benchmarks: the 105 LEAF writers with
train and test samples as clients, a small CNN (two 5x5 conv + pool blocks, 62 classes), SGD lr 0.05, batch 16,
one local epoch, central evaluation on all writers' test samples."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedlearn.data import FederatedDataset, load_femnist_npz
from fedlearn.torch import TorchClient, state_of
from fedlearn.torch.train import central_evaluator
from fedlearn.types import State

FEMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "femnist" / "femnist_leaf_subset.npz"


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 62),
    )


class FemnistTask:
    """Data, clients, initial model (seeded) and central evaluation."""

    def __init__(self, path: Path = FEMNIST, seed: int = 0, lr: float = 0.05) -> None:
        if not path.exists():
            raise SystemExit(f"FEMNIST not found at {path}; it ships in the shared data folder beside the clone")
        self.data: FederatedDataset = load_femnist_npz(path)
        self.lr = lr
        torch.manual_seed(seed)
        self.initial_state: State = state_of(cnn())
        self.central_eval = central_evaluator(cnn, *self.data.test)

    @property
    def client_ids(self) -> list[str]:
        return list(self.data.client_ids)

    def client(self, cid: str) -> TorchClient:
        x, y = self.data.clients[cid]
        return TorchClient(cid, cnn, x, y, batch_size=16, lr=self.lr)
