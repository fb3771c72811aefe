"""Apps and client factories for the deployment tests of personalisation and federated LoRA: the server runs
`fedlearn server --app personal_app:make_fedper_app` (or `make_lora_app`), each client process
`fedlearn client --client-module personal_app:make_fedper_client` (or `make_lora_client`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedlearn import App
from fedlearn.data import load_digits
from fedlearn.personalization import ClientStateStore, PersonalTorchClient, shared_state
from fedlearn.torch import TorchClient

FIT = {"local_epochs": 2, "batch_size": 16, "lr": 0.2}


class HeadNet(nn.Module):
    """A body that is federated and a `head` that FedPer keeps on each client (two layers, larger than the
    body, so that a head on the wire would stand out from the message overhead)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 24), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def permuted_digits(index: int, num_clients: int) -> tuple[np.ndarray, ...]:
    """Client `index` of `num_clients`: an IID share of digits whose labels go through the client's own
    permutation (client 0 keeps them), split 75/25 into train and test. One global head cannot serve two
    clients; a personal head on a shared body can."""
    data = load_digits(seed=0)
    rng = np.random.default_rng(0)
    rows = np.array_split(rng.permutation(len(data.y_train)), num_clients)[index]
    perm = np.arange(10) if index == 0 else np.random.default_rng(100 + index).permutation(10)
    cut = int(0.75 * len(rows))
    x, y = data.x_train[rows], perm[data.y_train[rows]]
    return x[:cut], y[:cut], x[cut:], y[cut:]


def make_fedper_app() -> App:
    """The server's side: FedAvg over HeadNet's body only (the head is not in the global state)."""
    return App(initial_state=shared_state(HeadNet, ["head"]), strategy="fedavg", fit_config=dict(FIT))


def make_fedper_client(client_id: str, state_dir: str, num_clients: int = 2) -> PersonalTorchClient:
    """Client `client_id` ("0", "1", ...) with its head in a state store on its own disk at `state_dir`."""
    x, y, xt, yt = permuted_digits(int(client_id), int(num_clients))
    return PersonalTorchClient(client_id, HeadNet, x, y, x_test=xt, y_test=yt, store=ClientStateStore(state_dir),
                               method="fedper", local=["head"], **{k: FIT[k] for k in ("batch_size", "lr")})


# -- federated LoRA on a tiny randomly initialised BERT (the bundled MiniLM is too slow for a process test) --
VOCAB, LENGTH = 40, 8


def save_tiny_bert(folder: str | Path) -> Path:
    """A 1-layer BERT with hidden size 16 (random weights, seed 0) saved as a pretrained model folder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=LENGTH)
    BertModel(config).save_pretrained(str(folder))
    return Path(folder)


def lora_factory(model_dir: str):
    from fedlearn.torch.lora import LoraModelFactory

    return LoraModelFactory(2, rank=2, path=model_dir)


def token_task(index: int, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Client `index`'s sequences of ids in (n, 2, LENGTH) form; label 1 when token 3 occurs."""
    rng = np.random.default_rng(index)
    ids = rng.integers(4, VOCAB, size=(n, LENGTH))
    y = rng.integers(0, 2, size=n)
    ids[y == 1, rng.integers(1, LENGTH, size=int(y.sum()))] = 3
    return np.stack([ids, np.ones_like(ids)], axis=1), y


def make_lora_app(model_dir: str) -> App:
    """The server's side: FedAvg over the adapters and head of the tiny BERT in `model_dir`."""
    return App(initial_state=lora_factory(model_dir).trainable_state(), strategy="fedavg",
               fit_config={"local_epochs": 1, "batch_size": 8, "lr": 0.1})


def make_lora_client(client_id: str, model_dir: str) -> TorchClient:
    x, y = token_task(int(client_id))
    return TorchClient(client_id, lora_factory(model_dir), x, y, batch_size=8, lr=0.1)
