"""Split sample indices over clients: IID, label skew (Dirichlet), pathological shards, quantity skew.

Every partitioner takes an explicit `np.random.Generator`, so a seed reproduces the split, and returns one
sorted int64 index array per client; the arrays are disjoint, cover every sample once and are non-empty.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_DIRICHLET_TRIES = 100  # resamples before topping up small clients by hand


def _check_clients(num_samples: int, num_clients: int, per_client: int = 1) -> None:
    """Reject client counts that cannot give every client `per_client` samples."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1; got {num_clients}")
    if num_samples < num_clients * per_client:
        raise ValueError(
            f"cannot give {num_clients} clients {per_client} sample(s) each from {num_samples} samples; "
            "use fewer clients"
        )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array; got shape {labels.shape}")
    return labels


def _split_sorted(indices: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut `indices` into consecutive pieces of the given sizes, each sorted and int64."""
    pieces = np.split(np.asarray(indices, dtype=np.int64), np.cumsum(sizes)[:-1])
    return [np.sort(p) for p in pieces]


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts (sizes differ by at most one)."""
    _check_clients(num_samples, num_clients)
    sizes = np.full(num_clients, num_samples // num_clients)
    sizes[: num_samples % num_clients] += 1
    return _split_sorted(rng.permutation(num_samples), sizes)


def _top_up(counts: np.ndarray, min_size: int) -> None:
    """Move samples (class by class) from the largest clients into clients holding fewer than `min_size`.

    `counts` is a (classes, clients) matrix, changed in place; taking the donor's most frequent class
    keeps the donor's label skew while the receiver gets a single label, as a small Dirichlet draw would.
    """
    sizes = counts.sum(axis=0)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            label = int(np.argmax(counts[:, donor]))
            moved = min(min_size - sizes[client], counts[label, donor], sizes[donor] - min_size)
            counts[label, donor] -= moved
            counts[label, client] += moved
            sizes[donor] -= moved
            sizes[client] += moved


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over the clients with proportions drawn from Dir(alpha).

    Small alpha (e.g. 0.1) gives clients few labels, large alpha approaches IID. Draws are repeated until
    every client has `min_size` samples; if that keeps failing, samples move from the largest clients.
    """
    labels = _check_labels(labels)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive (small = strong label skew); got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1; got {min_size}")
    _check_clients(len(labels), num_clients, min_size)
    classes, label_ids = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(label_ids, minlength=len(classes))
    for _ in range(_DIRICHLET_TRIES):
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(classes))
        counts = rng.multinomial(class_sizes, proportions)  # (classes, clients)
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        _top_up(counts, min_size)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(label_ids == c))
        for client, piece in enumerate(np.split(members, np.cumsum(counts[c])[:-1])):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, shards_per_client: int = 2
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017): sort by label, cut equal shards, deal them out.

    When every class fills whole shards, each client sees at most `shards_per_client` labels.
    """
    labels = _check_labels(labels)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be at least 1; got {shards_per_client}")
    _check_clients(len(labels), num_clients, shards_per_client)
    shuffled = rng.permutation(len(labels))  # random order within each label
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_clients * shards_per_client)
    owners = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in owners]


def quantity_skew(
    num_samples: int, num_clients: int, rng: np.random.Generator, sigma: float = 1.0
) -> list[np.ndarray]:
    """Size-skewed split: client shares ~ lognormal(0, sigma), samples assigned at random (labels stay IID).

    sigma = 0 gives near-equal sizes; sigma = 2 gives a few very large clients and many small ones.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be non-negative; got {sigma}")
    _check_clients(num_samples, num_clients)
    shares = rng.lognormal(0.0, sigma, num_clients)
    sizes = 1 + rng.multinomial(num_samples - num_clients, shares / shares.sum())
    return _split_sorted(rng.permutation(num_samples), sizes)


def _histogram(labels: np.ndarray, num_classes: int, top: int = 6) -> str:
    """Compact label histogram: the `top` most frequent labels as label:count, then how many more."""
    counts = np.bincount(labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    shown = present[np.argsort(-counts[present], kind="stable")][:top]
    text = " ".join(f"{c}:{counts[c]}" for c in shown)
    return text + (f" +{len(present) - len(shown)} more" if len(present) > len(shown) else "")


def label_table(client_labels: Mapping[str, np.ndarray], num_classes: int, max_rows: int = 20) -> str:
    """Printable per-client table (id, size, label histogram) with a total line, to eyeball a split."""
    ids = list(client_labels)
    if not ids:
        return "no clients"
    sizes = np.array([len(client_labels[i]) for i in ids])
    shown = ids[:max_rows]
    width = max([len("client"), *map(len, shown)])
    lines = [f"{'client':<{width}}  {'n':>7}  labels (label:count)"]
    lines += [
        f"{cid:<{width}}  {len(client_labels[cid]):>7}  {_histogram(client_labels[cid], num_classes)}"
        for cid in shown
    ]
    if len(ids) > len(shown):
        lines.append(f"... {len(ids) - len(shown)} more clients")
    lines.append(
        f"total: {sizes.sum()} samples over {len(ids)} clients "
        f"(size min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()})"
    )
    return "\n".join(lines)


def summarize(labels: np.ndarray, parts: list[np.ndarray], num_classes: int, max_rows: int = 20) -> str:
    """Table of a partition (clients named by position) as `label_table` prints it."""
    labels = _check_labels(labels)
    return label_table({str(i): labels[p] for i, p in enumerate(parts)}, num_classes, max_rows)
