"""LEAF JSON loader: each user becomes a client, the natural partition of FEMNIST, Sent140, Shakespeare..."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import FederatedDataset, from_client_arrays


class LeafFormatError(ValueError):
    """A file that does not follow LEAF's JSON layout."""


def _files(paths: str | Path | list[str | Path]) -> list[Path]:
    """The JSON files named by `paths`; a directory stands for all *.json files in it."""
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    if not files:
        raise ValueError(f"no LEAF JSON files found in {paths}")
    return files


def _users(path: Path) -> Iterator[tuple[str, list, list]]:
    """(user, x rows, y values) for each user listed in one LEAF file, after checking the layout."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LeafFormatError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not {"users", "user_data"} <= data.keys():
        raise LeafFormatError(
            f"{path}: a LEAF file is an object with keys 'users', 'num_samples', 'user_data'"
        )
    users, user_data, num_samples = data["users"], data["user_data"], data.get("num_samples")
    if not (isinstance(users, list) and isinstance(user_data, dict) and isinstance(num_samples, list | None)):
        raise LeafFormatError(f"{path}: 'users' and 'num_samples' must be lists and 'user_data' an object")
    if num_samples is not None and len(num_samples) != len(users):
        raise LeafFormatError(f"{path}: {len(num_samples)} entries in 'num_samples' but {len(users)} users")
    for i, user in enumerate(users):
        entry = user_data.get(user)
        if not isinstance(entry, dict) or not {"x", "y"} <= entry.keys():
            raise LeafFormatError(
                f"{path}: user {user!r} needs an entry {{'x': [...], 'y': [...]}} in 'user_data'"
            )
        x, y = entry["x"], entry["y"]
        if not isinstance(x, list) or not isinstance(y, list):
            raise LeafFormatError(f"{path}: 'x' and 'y' of user {user!r} must be lists")
        if len(x) != len(y):
            raise LeafFormatError(f"{path}: user {user!r} has {len(x)} x rows but {len(y)} labels")
        if num_samples is not None and num_samples[i] != len(y):
            raise LeafFormatError(
                f"{path}: user {user!r} has {len(y)} samples but num_samples says {num_samples[i]}"
            )
        yield str(user), x, y


def load_leaf_json(
    paths: str | Path | list[str | Path],
    *,
    num_classes: int | None = None,
    x_transform: Callable[[Any], np.ndarray] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedDataset:
    """Federated data from LEAF JSON files (or directories of them); a user in several files is merged.

    x rows must be numeric lists of one length unless `x_transform` turns each row into an array (e.g.
    text into a bag of words); y must be integer labels. Users without samples are skipped; each user's
    samples are split into train and `client_test` by `test_fraction` (see `from_client_arrays`).
    """
    files = _files(paths)
    rows: dict[str, tuple[list, list]] = {}
    for path in files:
        for user, x, y in _users(path):
            xs, ys = rows.setdefault(user, ([], []))
            xs.extend(x)
            ys.extend(y)
    per_user = {}
    for user, (xs, ys) in rows.items():
        if not ys:
            continue
        if x_transform is not None:
            xs = [x_transform(row) for row in xs]
        try:
            per_user[user] = (np.asarray(xs, dtype=np.float32), ys)
        except (TypeError, ValueError) as err:
            raise LeafFormatError(
                f"x rows of user {user!r} are not numeric arrays of one shape ({err}); "
                "pass x_transform=... to turn each row into an array"
            ) from err
    if not per_user:
        raise ValueError(f"no user in {[str(f) for f in files]} has any samples")
    name = f"leaf:{files[0].parent.name}"
    return from_client_arrays(
        per_user, name=name, num_classes=num_classes, test_fraction=test_fraction, seed=seed
    )
