"""UCI Heart Disease as four hospitals, prepared as FLamby's Fed-Heart-Disease (Ogier du Terrail et al. 2022),
so results can be set beside FLamby's published table.

Reads the UCI files ``processed.{cleveland,hungarian,switzerland,va}.data`` (one client per hospital) and
follows FLamby's preparation:

- columns slope, ca and thal are dropped (mostly missing outside Cleveland), then every row with a missing
  value (``?``) left: 303 / 261 / 46 / 130 rows;
- chest-pain type and resting ECG are one-hot encoded without their first level: 13 features;
- the target is 0 (no disease) or 1 (UCI's levels 1-4);
- each hospital is split 66% train / 34% test with seed 43, stratified by label where both classes have
  more than two rows (199/104, 172/89, 30/16, 85/45);
- features are standardised with each hospital's own training mean and (sample) standard deviation, as
  FLamby does, or optionally with those of all hospitals' training rows together.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import Arrays, FederatedDataset, _with_client_test

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
NORMALIZATIONS = ("hospital", "global", "none")
_COLUMNS = 14  # 13 attributes + target, in UCI's "processed" order
_DROPPED = (10, 11, 12)  # slope, ca, thal
_CATEGORICAL = {2: (1.0, 2.0, 3.0, 4.0), 6: (0.0, 1.0, 2.0)}  # chest-pain type, resting ECG: their levels
_TRAIN_FRACTION, _SPLIT_SEED = 0.66, 43


def read_uci_file(path: str | Path) -> np.ndarray:
    """One ``processed.*.data`` file as a float array (rows, 14), with NaN where the file has ``?``."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != _COLUMNS:
            raise ValueError(f"{path}, line {number}: expected {_COLUMNS} comma-separated values, got {len(fields)}")
        try:
            rows.append([np.nan if f.strip() == "?" else float(f) for f in fields])
        except ValueError:
            raise ValueError(f"{path}, line {number}: values must be numbers or '?', got {line!r}") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return np.array(rows)


def _encode(table: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Drop FLamby's columns and incomplete rows, one-hot encode, binarise the target: (x (n, 13), y)."""
    table = np.delete(table, _DROPPED, axis=1)
    table = table[~np.isnan(table).any(axis=1)]
    kept = [c for c in range(table.shape[1] - 1) if c not in _CATEGORICAL]
    columns = [table[:, kept]]
    for column, levels in _CATEGORICAL.items():
        unknown = set(np.unique(table[:, column])) - set(levels)
        if unknown:
            raise ValueError(f"{path}: column {column} has levels {sorted(unknown)}, expected only {levels}")
        columns.append(table[:, [column]] == np.array(levels[1:]))
    return np.hstack(columns).astype(np.float64), (table[:, -1] > 0).astype(np.int64)


def _split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-hospital train/test indices."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=2)
    stratify = y if (counts > 2).all() else None
    return train_test_split(np.arange(len(y)), train_size=_TRAIN_FRACTION, test_size=1.0 - _TRAIN_FRACTION,
                            random_state=_SPLIT_SEED, shuffle=True, stratify=stratify)


def _standardize(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(x - mean) / std with the statistics of `reference`; a constant column is only centred."""
    mean, std = reference.mean(axis=0), reference.std(axis=0, ddof=1)
    return (x - mean) / np.where(std > 0, std, 1.0)


def load_heart_disease(folder: str | Path, normalization: str = "hospital") -> FederatedDataset:
    """The four hospitals as clients, with their FLamby train/test splits as `clients` / `client_test`.

    `normalization` is "hospital" (each hospital's own training statistics: FLamby's federated setting),
    "global" (statistics of all hospitals' training rows, which a federation obtains by summing each
    hospital's count, sum and sum of squares; FLamby's pooled baseline uses these) or "none".
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    folder = Path(folder)
    missing = [h for h in HOSPITALS if not (folder / f"processed.{h}.data").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks processed.{{{','.join(missing)}}}.data from the UCI Heart Disease set")
    train: dict[str, Arrays] = {}
    test: dict[str, Arrays] = {}
    for hospital in HOSPITALS:
        path = folder / f"processed.{hospital}.data"
        x, y = _encode(read_uci_file(path), path)
        tr, te = _split(y)
        train[hospital], test[hospital] = (x[tr], y[tr]), (x[te], y[te])
    every_train_row = np.concatenate([x for x, _ in train.values()])

    def prepare(x: np.ndarray, hospital: str) -> np.ndarray:
        if normalization != "none":
            x = _standardize(x, train[hospital][0] if normalization == "hospital" else every_train_row)
        return x.astype(np.float32)

    clients = {h: (prepare(x, h), y) for h, (x, y) in train.items()}
    client_test = {h: (prepare(x, h), y) for h, (x, y) in test.items()}
    return _with_client_test("heart_disease", clients, client_test, num_classes=2)
