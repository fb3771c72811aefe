"""Tests of the data layer: partitioners, loaders, synthetic data and the LEAF formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn.data import (
    CentralData,
    FederatedDataset,
    LeafFormatError,
    dirichlet,
    federate,
    from_arrays,
    from_client_arrays,
    from_torch_dataset,
    iid,
    load_breast_cancer,
    load_digits,
    load_femnist_npz,
    load_leaf_json,
    make_synthetic,
    quantity_skew,
    shards,
    summarize,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABELS = np.repeat(np.arange(5), [30, 12, 8, 6, 4])  # 60 samples, unbalanced classes


def split_with(name: str, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "iid":
        return iid(len(labels), num_clients, rng)
    if name == "dirichlet":
        return dirichlet(labels, num_clients, 0.3, rng)
    if name == "shards":
        return shards(labels, num_clients, rng, shards_per_client=1)
    return quantity_skew(len(labels), num_clients, rng, sigma=2.0)


def assert_partition(parts: list[np.ndarray], num_samples: int) -> None:
    """Disjoint, covering every sample once, every client non-empty, each part sorted int64."""
    assert all(len(p) >= 1 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(num_samples))


def label_entropy(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean entropy (nats) of the clients' label distributions."""
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=num_classes) / len(p)
        entropies.append(-np.sum(freq[freq > 0] * np.log(freq[freq > 0])))
    return float(np.mean(entropies))


# --- partitioners -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
@pytest.mark.parametrize("num_clients", [1, 7, 55, 60])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partition_is_disjoint_complete_and_nonempty(name, num_clients, seed):
    parts = split_with(name, LABELS, num_clients, seed)
    assert len(parts) == num_clients
    assert_partition(parts, len(LABELS))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    fraction=st.floats(0.0, 1.0),
    alpha=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_partition_property(labels, fraction, alpha, seed):
    labels = np.array(labels)
    num_clients = max(1, int(fraction * len(labels)))
    rng = np.random.default_rng(seed)
    assert_partition(dirichlet(labels, num_clients, alpha, rng), len(labels))
    assert_partition(quantity_skew(len(labels), num_clients, rng, sigma=alpha), len(labels))
    assert_partition(shards(labels, num_clients, rng, shards_per_client=1), len(labels))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_partition_is_reproducible_per_seed(name):
    first, again, other = (split_with(name, LABELS, 6, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    skewed = label_entropy(labels, dirichlet(labels, 10, 0.1, rng), 10)
    uniform = label_entropy(labels, iid(len(labels), 10, rng), 10)
    assert uniform > 2.0  # close to log(10) = 2.30
    assert skewed < uniform - 1.0


def test_dirichlet_tops_up_clients_to_min_size():
    labels = np.repeat(np.arange(4), 25)
    parts = dirichlet(labels, 20, 0.01, np.random.default_rng(0), min_size=5)
    assert_partition(parts, 100)
    assert all(len(p) == 5 for p in parts)


def test_shards_give_each_client_at_most_its_shard_count_of_labels():
    labels = np.repeat(np.arange(10), 20)  # 20 shards of 10 samples, each a single label
    parts = shards(labels, 10, np.random.default_rng(0), shards_per_client=2)
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_quantity_skew_sizes_vary_strongly():
    sizes = np.array([len(p) for p in quantity_skew(10_000, 50, np.random.default_rng(0), sigma=2.0)])
    assert sizes.max() > 20 * sizes.min()
    even = np.array([len(p) for p in quantity_skew(10_000, 50, np.random.default_rng(0), sigma=0.0)])
    assert even.max() < 1.5 * even.min()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda rng: iid(10, 0, rng), "num_clients must be at least 1; got 0"),
        (lambda rng: iid(10, 11, rng), "cannot give 11 clients 1 sample"),
        (lambda rng: dirichlet(LABELS, 5, 0.0, rng), "alpha must be positive"),
        (lambda rng: dirichlet(LABELS, 20, 1.0, rng, min_size=4), "cannot give 20 clients 4 sample"),
        (lambda rng: dirichlet(LABELS.reshape(6, 10), 5, 1.0, rng), r"labels must be a 1-D array; got shape \(6, 10\)"),
        (lambda rng: shards(LABELS, 31, rng, shards_per_client=2), "cannot give 31 clients 2 sample"),
        (lambda rng: shards(LABELS, 5, rng, shards_per_client=0), "shards_per_client must be at least 1"),
        (lambda rng: quantity_skew(10, 3, rng, sigma=-1.0), "sigma must be non-negative"),
    ],
)
def test_partitioners_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.random.default_rng(0))


def test_summarize_lists_clients_and_totals():
    parts = iid(len(LABELS), 30, np.random.default_rng(0))
    text = summarize(LABELS, parts, num_classes=5, max_rows=4)
    assert all(f"\n{i} " in text for i in range(4))
    assert "\n4 " not in text
    assert "26 more clients" in text
    assert "total: 60 samples over 30 clients" in text


# --- pooled data sets ---------------------------------------------------------------------------


def test_load_digits_shapes_range_and_stratification():
    data = load_digits(test_size=0.2, seed=0)
    assert (data.x_train.shape, data.x_test.shape) == ((1437, 64), (360, 64))
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.input_shape == (64,) and data.num_classes == 10
    assert data.x_train.min() >= 0.0 and data.x_train.max() == 1.0
    train_freq = np.bincount(data.y_train, minlength=10) / len(data.y_train)
    test_freq = np.bincount(data.y_test, minlength=10) / len(data.y_test)
    np.testing.assert_allclose(train_freq, test_freq, atol=0.01)
    np.testing.assert_array_equal(load_digits(seed=0).y_test, data.y_test)
    assert not np.array_equal(load_digits(seed=1).y_test, data.y_test)


def test_load_breast_cancer_standardises_with_training_statistics_only():
    from sklearn.datasets import load_breast_cancer as raw_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = raw_breast_cancer(return_X_y=True)
    x_train, x_test, _, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    data = load_breast_cancer(test_size=0.2, seed=0)
    assert data.x_train.dtype == np.float32 and data.num_classes == 2
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.x_train.std(axis=0), 1.0, atol=1e-4)
    np.testing.assert_allclose(data.x_test, (x_test - mean) / std, atol=1e-4)
    assert np.abs(data.x_test.mean(axis=0)).max() > 0.01  # test statistics were not used


def test_from_arrays_casts_and_splits():
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    y = np.array([0.0, 1.0] * 10)
    data = from_arrays(x, y, test_size=0.25, seed=0, name="toy")
    assert isinstance(data, CentralData) and data.name == "toy"
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert (len(data.y_train), len(data.y_test)) == (15, 5)
    assert data.num_classes == 2
    given_test = from_arrays(x, y, x[:3], y[:3], num_classes=4)
    assert len(given_test.y_train) == 20 and given_test.num_classes == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.zeros((5, 2)), y=np.zeros(4)), "x has 5 samples but y has 4 labels"),
        (dict(x=np.zeros((4, 2)), y=[0, 1, -1, 0]), r"class indices in \[0, num_classes\); found -1"),
        (dict(x=np.zeros((4, 2)), y=[0, 1, 0.5, 0]), "must be integer class indices; got dtype float64"),
        (dict(x=np.zeros((4, 2)), y=["a", "b", "a", "b"]), "must be integer class indices; got dtype <U1"),
        (dict(x=np.zeros((4, 2)), y=[0, 1, 2, 3], num_classes=3), r"labels must lie in \[0, 3\); found label 3"),
        (dict(x=np.zeros((4, 2)), y=np.zeros((4, 2))), "1-D class indices \\(not one-hot\\)"),
        (dict(x=np.zeros(4), y=[0, 1, 0, 1]), r"must have shape \(n_samples, \*features\); got \(4,\)"),
        (dict(x=np.zeros((4, 2)), y=[0, 1, 0, 1], x_test=np.zeros((2, 2))), "give both x_test and y_test, or neither"),
        (dict(x=np.zeros((4, 2)), y=[0, 1, 0, 1], x_test=np.zeros((2, 3)), y_test=[0, 1]),
         r"test samples have shape \(3,\) but training samples \(2,\)"),
        (dict(x=np.zeros((4, 2)), y=[0, 1, 0, 1], test_size=1.5), r"test_size must be in \(0, 1\); got 1.5"),
    ],
)
def test_from_arrays_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_arrays(**kwargs)


def test_from_torch_dataset_materialises_pairs():
    import torch
    from torch.utils.data import TensorDataset

    x = torch.randn(30, 3, 4)
    y = torch.arange(30) % 3
    data = from_torch_dataset(TensorDataset(x, y), test_size=0.2, seed=0, name="torch")
    assert data.input_shape == (3, 4) and data.num_classes == 3 and data.name == "torch"
    assert len(data.y_train) + len(data.y_test) == 30
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    with pytest.raises(ValueError, match=r"dataset\[0\] must be an \(x, y\) pair; got Tensor"):
        from_torch_dataset([torch.zeros(2)] * 4)


# --- federated data sets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partition, options",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.5}),
        ("shards", {"shards_per_client": 2}),
        ("quantity", {"sigma": 1.0}),
    ],
)
def test_federate_splits_training_data_over_clients(partition, options):
    data = load_digits()
    fed = federate(data, partition, 12, seed=0, **options)
    assert isinstance(fed, FederatedDataset)
    assert fed.client_ids == [str(i) for i in range(12)]
    assert sum(len(y) for _, y in fed.clients.values()) == len(data.y_train)
    assert fed.test[0] is data.x_test and fed.client_test is None
    assert fed.input_shape == (64,) and fed.num_classes == 10
    x0, y0 = fed.clients["0"]
    assert len(x0) == len(y0) >= 1


def test_federate_rejects_unknown_partition_and_options():
    data = load_digits()
    with pytest.raises(ValueError, match="dirichlet"):
        federate(data, "label_skew", 5)
    with pytest.raises(ValueError, match="alpha"):
        federate(data, "dirichlet", 5)  # alpha missing
    with pytest.raises(ValueError, match="shards_per_client"):
        federate(data, "shards", 5, alpha=0.1)


def test_summary_shows_client_ids_and_totals():
    fed = federate(load_digits(), "dirichlet", 25, alpha=0.3)
    text = fed.summary(max_rows=10)
    assert all(f"\n{cid} " in text for cid in fed.client_ids[:10])
    assert "15 more clients" in text and "total: 1437 samples over 25 clients" in text
    assert all(f"\n{cid} " in fed.summary(max_rows=30) for cid in fed.client_ids)


def synthetic_label_distance(fed: FederatedDataset) -> float:
    """Mean total-variation distance between each device's label distribution and the pooled one."""
    pooled = np.bincount(np.concatenate([y for _, y in fed.clients.values()]), minlength=fed.num_classes)
    pooled = pooled / pooled.sum()
    dists = [
        0.5 * np.abs(np.bincount(y, minlength=fed.num_classes) / len(y) - pooled).sum()
        for _, y in fed.clients.values()
    ]
    return float(np.mean(dists))


def test_synthetic_is_deterministic_per_seed():
    a, b, c = (make_synthetic(1, 1, 10, seed=seed) for seed in (5, 5, 6))
    for cid in a.client_ids:
        np.testing.assert_array_equal(a.clients[cid][0], b.clients[cid][0])
        np.testing.assert_array_equal(a.client_test[cid][1], b.client_test[cid][1])
    assert not np.array_equal(a.clients["0"][0][:5], c.clients["0"][0][:5])


def test_synthetic_shapes_sizes_and_labels():
    fed = make_synthetic(0.5, 0.5, 30, seed=0, max_samples=1000)
    assert fed.client_ids == [str(k) for k in range(30)]
    assert fed.input_shape == (60,) and fed.num_classes == 10
    sizes = np.array([len(fed.clients[c][1]) + len(fed.client_test[c][1]) for c in fed.client_ids])
    assert sizes.min() >= 50 and sizes.max() <= 1000
    assert sizes.max() > 3 * sizes.min()  # lognormal: a few large devices
    all_y = np.concatenate([y for _, y in fed.clients.values()])
    assert all_y.dtype == np.int64 and all_y.min() >= 0 and all_y.max() < 10
    assert fed.clients["0"][0].dtype == np.float32
    test_sizes = sum(len(y) for _, y in fed.client_test.values())
    assert len(fed.test[1]) == test_sizes > 0
    np.testing.assert_allclose(len(fed.client_test["0"][1]) / sizes[0], 0.2, atol=0.02)


def test_synthetic_devices_differ_unless_iid():
    skewed = synthetic_label_distance(make_synthetic(1, 1, 20, seed=0))
    uniform = synthetic_label_distance(make_synthetic(0, 0, 20, seed=0, iid=True))
    assert skewed > 0.4
    assert uniform < 0.2


def test_from_client_arrays_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="shape"):
        from_client_arrays({"a": (np.zeros((3, 2)), [0, 1, 0]), "b": (np.zeros((3, 4)), [0, 1, 0])})


# --- LEAF ----------------------------------------------------------------------------------------


def write_leaf(path: Path, users: dict[str, tuple[list, list]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "users": list(users),
                "num_samples": [len(y) for _, y in users.values()],
                "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
            }
        )
    )
    return path


def test_load_leaf_json_merges_files_and_splits_users(tmp_path):
    rows = [[float(i), float(i) + 0.5] for i in range(10)]
    first = write_leaf(
        tmp_path / "a.json", {"ann": (rows, [i % 3 for i in range(10)]), "bob": ([[1.0, 2.0]], [2])}
    )
    second = write_leaf(tmp_path / "b.json", {"cy": ([], []), "ann": ([[9.0, 9.0]] * 5, [1] * 5)})
    fed = load_leaf_json([first, second], test_fraction=0.2, seed=0)
    assert fed.client_ids == ["ann", "bob"]  # cy has no samples
    assert fed.input_shape == (2,) and fed.num_classes == 3
    assert (len(fed.clients["ann"][1]), len(fed.client_test["ann"][1])) == (12, 3)
    assert (len(fed.clients["bob"][1]), len(fed.client_test["bob"][1])) == (1, 0)
    assert fed.clients["ann"][0].dtype == np.float32 and fed.clients["ann"][1].dtype == np.int64
    assert len(fed.test[1]) == 3
    assert load_leaf_json(tmp_path, num_classes=5).num_classes == 5  # a directory of files


def test_load_leaf_json_applies_x_transform(tmp_path):
    rows = [["a", "hello"], ["b", "hi"], ["c", "hey you"]]
    path = write_leaf(tmp_path / "text.json", {"u": (rows, [0, 1, 1])})
    with pytest.raises(LeafFormatError, match="x_transform"):
        load_leaf_json(path)
    fed = load_leaf_json(path, x_transform=lambda row: np.array([len(row[1])]), test_fraction=0.0)
    np.testing.assert_array_equal(fed.clients["u"][0][:, 0], [5, 2, 7])


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"users": ["u"], "num_samples": [1]}), "a LEAF file is an object with keys"),  # no user_data
        (json.dumps({"user_data": {}, "num_samples": []}), "a LEAF file is an object with keys"),  # no users
        (json.dumps({"users": ["u"], "num_samples": [1], "user_data": {}}), "user 'u' needs an entry"),
        (json.dumps({"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[1.0]], "y": [0, 1]}}}),
         "user 'u' has 1 x rows but 2 labels"),
        (json.dumps({"users": ["u"], "num_samples": [3], "user_data": {"u": {"x": [[1.0]], "y": [0]}}}),
         "user 'u' has 1 samples but num_samples says 3"),
        (json.dumps({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[1.0]]}}}), "user 'u' needs an entry"),
        (json.dumps({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[1.0]], "y": [0.5]}}}),
         "y of client 'u' must be integer class indices"),
        (json.dumps({"users": ["u"], "num_samples": 1, "user_data": {"u": {"x": [[1.0]], "y": [0]}}}),
         "'users' and 'num_samples' must be lists"),
        (json.dumps({"users": ["u"], "user_data": {"u": {"x": 1.0, "y": 0}}}), "'x' and 'y' of user 'u' must be lists"),
    ],
)
def test_load_leaf_json_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_leaf_json(path)


def test_load_femnist_npz_on_shared_subset():
    path = SHARED_DATA / "femnist" / "femnist_leaf_subset.npz"
    if not path.exists():
        pytest.skip(f"shared data not present at {path}")
    fed = load_femnist_npz(path)
    assert len(fed.clients) == 105 and fed.num_classes == 62
    assert fed.input_shape == (1, 28, 28)
    x, y = fed.clients[fed.client_ids[0]]
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == np.int64
    assert set(fed.client_test) == set(fed.clients)
    assert all(len(fed.client_test[c][1]) >= 1 for c in fed.client_ids)
    assert len(fed.test[1]) == sum(len(y) for _, y in fed.client_test.values())


def test_load_femnist_npz_rejects_other_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2))
    with pytest.raises(ValueError, match="writer"):
        load_femnist_npz(path)
