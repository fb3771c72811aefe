"""Data sets for federated experiments: pooled data, its federated form, and loaders that need no download.

scikit-learn is imported inside the loaders that use it, since importing it is slow.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import partition as partitioning

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass
class CentralData:
    """One pooled data set (train and test) before it is split over clients."""

    name: str
    x_train: np.ndarray  # float32, shape (n, *input_shape)
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass
class FederatedDataset:
    """Training data split over clients, plus a central test set for server-side evaluation.

    `client_test` holds per-client held-out data where the data has a natural per-client split
    (LEAF users, synthetic devices); it is None for data federated from a pooled set.
    """

    name: str
    clients: dict[str, Arrays]  # client id -> (x float32, y int64), insertion-ordered
    test: Arrays
    num_classes: int
    client_test: dict[str, Arrays] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.test[0].shape[1:])

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)

    def summary(self, max_rows: int = 20) -> str:
        """Printable per-client table (id, size, compact label histogram) and a total line."""
        header = (
            f"{self.name}: {len(self.clients)} clients, input shape {self.input_shape}, "
            f"{self.num_classes} classes, {len(self.test[1])} central test samples"
        )
        table = partitioning.label_table(
            {cid: y for cid, (_, y) in self.clients.items()}, self.num_classes, max_rows
        )
        return f"{header}\n{table}"


def _features(x: Any, what: str) -> np.ndarray:
    """`x` as a float32 array of shape (n >= 1, *features)."""
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be numeric with one shape per sample: {err}") from err
    if x.ndim < 2:
        raise ValueError(
            f"{what} must have shape (n_samples, *features); got {x.shape}. "
            "For one feature per sample use x.reshape(-1, 1)."
        )
    if len(x) == 0:
        raise ValueError(f"{what} has no samples")
    return x


def _labels(y: Any, what: str) -> np.ndarray:
    """`y` as a 1-D int64 array of non-negative whole numbers."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D class indices (not one-hot); got shape {y.shape}")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise ValueError(f"{what} must be integer class indices; got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{what} must be class indices in [0, num_classes); found {y.min()}")
    return y


def _pair(x: Any, y: Any, what: str) -> Arrays:
    """Validated (float32 x, int64 y) of equal length; `what` names them in errors."""
    x, y = _features(x, f"x of {what}"), _labels(y, f"y of {what}")
    if len(x) != len(y):
        raise ValueError(f"{what}: x has {len(x)} samples but y has {len(y)} labels")
    return x, y


def _num_classes(label_sets: Sequence[np.ndarray], num_classes: int | None) -> int:
    """`num_classes`, or max label + 1 when None; checks every label fits."""
    top = max(int(y.max()) for y in label_sets if y.size) + 1
    if num_classes is None:
        return top
    if top > num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); found label {top - 1}. Raise num_classes.")
    return num_classes


def _split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, ...]:
    """Train/test split, stratified by label whenever every class can appear on both sides."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1); got {test_size}")
    n_test = math.ceil(test_size * len(y))  # as scikit-learn counts it
    if not 1 <= n_test < len(y):
        raise ValueError(
            f"test_size={test_size} leaves no train or no test sample out of {len(y)}; "
            "pass x_test and y_test instead"
        )
    class_counts = np.unique(y, return_counts=True)[1]
    stratifiable = class_counts.min() >= 2 and min(n_test, len(y) - n_test) >= len(class_counts)
    stratify = y if stratifiable else None
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=stratify)


def from_arrays(
    x: Any,
    y: Any,
    x_test: Any = None,
    y_test: Any = None,
    *,
    name: str = "user",
    test_size: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
) -> CentralData:
    """Pooled data from user arrays: validated, cast (x float32, y int64), split when no test set is given."""
    x, y = _pair(x, y, "training data")
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither (a test split of size test_size is drawn)")
    if x_test is None:
        x, x_test, y, y_test = _split(x, y, test_size, seed)
    else:
        x_test, y_test = _pair(x_test, y_test, "test data")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"test samples have shape {x_test.shape[1:]} but training samples {x.shape[1:]}")
    return CentralData(name, x, y, x_test, y_test, _num_classes([y, y_test], num_classes))


def from_torch_dataset(dataset: Any, **kwargs: Any) -> CentralData:
    """Pooled data from a map-style torch Dataset of (x, y) pairs; `kwargs` go to `from_arrays`."""
    import torch  # only this loader needs torch

    def to_numpy(value: Any) -> np.ndarray:
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"dataset[{i}] must be an (x, y) pair; got {type(item).__name__}")
        xs.append(to_numpy(item[0]))
        ys.append(to_numpy(item[1]))
    if not xs:
        raise ValueError("the dataset is empty")
    return from_arrays(np.stack(xs), np.stack(ys), **kwargs)


def load_digits(test_size: float = 0.2, seed: int = 0) -> CentralData:
    """scikit-learn's 8x8 digits (1,797 samples, 10 classes), pixels scaled to [0, 1], x shape (n, 64)."""
    from sklearn import datasets

    x, y = datasets.load_digits(return_X_y=True)
    return from_arrays(x / 16.0, y, name="digits", test_size=test_size, seed=seed, num_classes=10)


def load_breast_cancer(test_size: float = 0.2, seed: int = 0) -> CentralData:
    """scikit-learn's breast cancer set (569 samples, 30 features, 2 classes), standardised.

    Mean and standard deviation come from the training split only, so no test information leaks.
    """
    from sklearn import datasets

    x, y = datasets.load_breast_cancer(return_X_y=True)
    data = from_arrays(x, y, name="breast_cancer", test_size=test_size, seed=seed, num_classes=2)
    mean = data.x_train.mean(axis=0)
    std = data.x_train.std(axis=0)
    std[std == 0] = 1.0
    return replace(data, x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std)


_PARTITIONS = {  # name -> (partitioner, whether it takes labels rather than a sample count)
    "iid": (partitioning.iid, False),
    "dirichlet": (partitioning.dirichlet, True),
    "shards": (partitioning.shards, True),
    "quantity": (partitioning.quantity_skew, False),
}


def federate(
    data: CentralData, partition: str, num_clients: int, *, seed: int = 0, **kwargs: Any
) -> FederatedDataset:
    """Split `data`'s training set over clients "0".."num_clients-1"; its test set becomes the central one.

    `partition` is "iid", "dirichlet" (needs alpha=...), "shards" (shards_per_client=...) or "quantity"
    (sigma=...); `kwargs` are those options.
    """
    if partition not in _PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose one of {sorted(_PARTITIONS)}")
    split, by_label = _PARTITIONS[partition]
    first = data.y_train if by_label else len(data.y_train)
    signature = inspect.signature(split)
    try:
        call = signature.bind(first, num_clients, rng=np.random.default_rng(seed), **kwargs)
    except TypeError as err:
        inputs = ("labels", "num_samples", "num_clients", "rng")
        options = [p for p in signature.parameters if p not in inputs]
        raise ValueError(f"partition {partition!r} takes options {options}: {err}") from err
    parts = split(*call.args, **call.kwargs)
    clients = {str(i): (data.x_train[idx], data.y_train[idx]) for i, idx in enumerate(parts)}
    return FederatedDataset(data.name, clients, (data.x_test, data.y_test), data.num_classes)


def _with_client_test(
    name: str, clients: dict[str, Arrays], client_test: dict[str, Arrays], num_classes: int
) -> FederatedDataset:
    """Naturally split data whose central test set is the union of the clients' held-out samples."""
    test = tuple(np.concatenate([pair[k] for pair in client_test.values()]) for k in (0, 1))
    return FederatedDataset(name, clients, test, num_classes, client_test)


def from_client_arrays(
    per_client: Mapping[str, tuple[Any, Any]],
    *,
    name: str = "user",
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedDataset:
    """Federated data from data already split by client (a natural partition), e.g. one file per site.

    Each client's samples are shuffled and `test_fraction` of them (rounded, never all) held out in
    `client_test`; a client with one sample keeps it for training. The central test set is their union.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    if not per_client:
        raise ValueError("no clients given")
    rng = np.random.default_rng(seed)
    clients: dict[str, Arrays] = {}
    client_test: dict[str, Arrays] = {}
    for cid, (x, y) in per_client.items():
        x, y = _pair(x, y, f"client {cid!r}")
        n_test = min(len(y) - 1, round(test_fraction * len(y)))
        order = rng.permutation(len(y))
        train, test = np.sort(order[n_test:]), np.sort(order[:n_test])
        clients[str(cid)] = (x[train], y[train])
        client_test[str(cid)] = (x[test], y[test])
    shapes = {x.shape[1:] for x, _ in clients.values()}
    if len(shapes) > 1:
        raise ValueError(f"clients' samples must share one shape; found {sorted(shapes)}")
    labels = [y for _, y in [*clients.values(), *client_test.values()]]
    return _with_client_test(name, clients, client_test, _num_classes(labels, num_classes))


def _synthetic_task(
    rng: np.random.Generator, alpha: float, beta: float, dim: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Synthetic(alpha, beta) device: its model W, b and its input mean v."""
    model_mean, input_mean = rng.normal(0.0, alpha), rng.normal(0.0, beta)
    w = rng.normal(model_mean, 1.0, (dim, num_classes))
    b = rng.normal(model_mean, 1.0, num_classes)
    return w, b, rng.normal(input_mean, 1.0, dim)


def make_synthetic(
    alpha: float,
    beta: float,
    num_devices: int = 30,
    *,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    iid: bool = False,
    test_fraction: float = 0.2,
    max_samples: int | None = 1000,
) -> FederatedDataset:
    """Synthetic(alpha, beta) of the FedProx paper (Li et al. 2020): a softmax-regression task per device.

    Device k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k, b_k has entries ~ N(u_k, 1) and
    its inputs x ~ N(v_k, Sigma) with v_k entries ~ N(B_k, 1), Sigma = diag(j^-1.2); y = argmax(x W_k + b_k).
    alpha sets how much the models differ, beta how much the inputs differ. As in the reference code,
    alpha and beta are standard deviations (the same as variances at the usual value 1). `iid=True` is the
    paper's Synthetic-IID: one W, b ~ N(0, 1) and x ~ N(0, Sigma) on all devices. Device sizes are
    int(lognormal(4, 2)) + 50 as in LEAF, capped at `max_samples` (None: no cap) to keep runs small.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be non-negative; got alpha={alpha}, beta={beta}")
    if num_devices < 1 or dim < 1 or num_classes < 2:
        raise ValueError(
            f"need num_devices >= 1, dim >= 1, num_classes >= 2; got {num_devices}, {dim}, {num_classes}"
        )
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1 or None; got {max_samples}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50
    if max_samples is not None:
        sizes = np.minimum(sizes, max_samples)
    scale = np.arange(1, dim + 1) ** -0.6  # square root of Sigma's diagonal j^-1.2
    shared = None
    if iid:  # Synthetic-IID: one model and one input distribution for every device
        shared = rng.normal(size=(dim, num_classes)), rng.normal(size=num_classes), np.zeros(dim)
    devices = {}
    for k, n in enumerate(sizes):
        w, b, v = shared or _synthetic_task(rng, alpha, beta, dim, num_classes)
        x = v + rng.normal(size=(n, dim)) * scale
        devices[str(k)] = (x, np.argmax(x @ w + b, axis=1))  # softmax keeps the argmax
    name = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
    return from_client_arrays(
        devices, name=name, num_classes=num_classes, test_fraction=test_fraction, seed=seed
    )


def load_femnist_npz(path: str | Path) -> FederatedDataset:
    """LEAF FEMNIST repacked as npz (arrays x (N,28,28) uint8, y, writer, split "train"/"test").

    Clients are the writers with both train and test samples, in sorted id order; x becomes float32 in
    [0, 1] of shape (n, 1, 28, 28); each writer's test samples are its `client_test`, and their union
    the central test set. 62 classes (digits, upper- and lower-case letters).
    """
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x", "y", "writer", "split"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}; a FEMNIST npz has x, y, writer, split")
        x, y, writer, split = npz["x"], npz["y"], npz["writer"], npz["split"]
    if x.ndim != 3 or x.shape[1:] != (28, 28) or not len(x) == len(y) == len(writer) == len(split):
        raise ValueError(f"{path}: need x of shape (N, 28, 28) and y, writer, split of length N")
    x = (x.astype(np.float32) / 255.0)[:, None]
    y = _labels(y, f"y of {path}")
    is_train, is_test = split == "train", split == "test"
    clients: dict[str, Arrays] = {}
    client_test: dict[str, Arrays] = {}
    for w in np.intersect1d(writer[is_train], writer[is_test]):
        mine = writer == w
        clients[str(w)] = (x[mine & is_train], y[mine & is_train])
        client_test[str(w)] = (x[mine & is_test], y[mine & is_test])
    if not clients:
        raise ValueError(f"{path}: no writer has both train and test samples")
    return _with_client_test("femnist", clients, client_test, _num_classes([y], 62))
