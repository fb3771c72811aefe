"""The four-hospital heart-disease task, written once for the server and for each hospital's client.

`make_app` is what the server runs (`fedlearn server --app hospitals:make_app`, or the `[app]` section of
server.toml): the model, the strategy, the settings each hospital trains with, and the rule that turns the
hospitals' own test results into the round's score. The server holds no patient data, so there is no central
evaluation: every hospital evaluates the global model on its own test split.

`make_client` is what each hospital runs (`fedlearn client --client-module hospitals:make_client`): a
`TorchClient` on that hospital's training rows, evaluating on its test rows. The data are the UCI files as
FLamby's Fed-Heart-Disease prepares them (`fedlearn.data.load_heart_disease`), each hospital standardising
with its own statistics, so no pooled statistic is needed.
"""
from __future__ import annotations

from pathlib import Path

import torch

import fedlearn
from fedlearn.data import FederatedDataset, load_heart_disease
from fedlearn.data.heart_disease import HOSPITALS  # noqa: F401  (the client ids: cleveland, hungarian, ...)
from fedlearn.metrics import client_mean_metrics
from fedlearn.torch import LogisticRegression, TorchClient

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "heart_disease"
FEATURES = 13
TRAINING = {"local_epochs": 1, "batch_size": 8, "lr": 0.05}


def model_fn() -> torch.nn.Module:
    """FLamby's baseline for this data set: logistic regression (here a two-class softmax)."""
    return LogisticRegression(FEATURES, 2)


def hospitals(data: str | Path = DATA) -> FederatedDataset:
    """The four hospitals (cleveland, hungarian, switzerland, va), each with its train and test split."""
    return load_heart_disease(data, normalization="hospital")


def make_app(strategy: str = "fedavg", lr: float = TRAINING["lr"], local_epochs: int = TRAINING["local_epochs"],
             data: str = "") -> fedlearn.App:
    """The server's task. Without `data` it holds no data at all (a deployment's server); with a folder it
    also simulates the hospitals (`fedlearn simulate --app hospitals:make_app --app-arg data=...`)."""
    fit_config = {**TRAINING, "lr": lr, "local_epochs": local_epochs}
    common = {"strategy": strategy, "fit_config": fit_config, "evaluate_metrics": client_mean_metrics}
    if not data:
        return fedlearn.App(model_fn=model_fn, **common)
    return fedlearn.App.from_data(hospitals(data), model_fn, central_eval=False, **common)


def make_client(client_id: str, data: str = str(DATA)) -> TorchClient:
    """Hospital `client_id`'s client: it trains on its own training rows and evaluates on its test rows."""
    fds = hospitals(data)
    if client_id not in fds.clients:
        raise ValueError(f"no hospital {client_id!r} in {data}; the hospitals are {', '.join(fds.client_ids)}")
    x_test, y_test = fds.client_test[client_id]
    return TorchClient(client_id, model_fn, *fds.clients[client_id], x_test=x_test, y_test=y_test, **TRAINING)
