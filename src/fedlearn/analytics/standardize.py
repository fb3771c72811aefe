"""Standardise features with federated statistics: (x - mean) / std per feature, the same on every client and
on the test set, without any party seeing pooled data."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..data import FederatedDataset

if TYPE_CHECKING:
    from .stats import FederatedStatistics


@dataclass(frozen=True)
class Standardizer:
    """(x - mean) / std per feature; a feature with std 0 (constant) is only centred. Inputs of any shape
    whose trailing dimensions hold `len(mean)` features are accepted; floating inputs keep their dtype."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        mean, std = np.asarray(self.mean, dtype=np.float64), np.asarray(self.std, dtype=np.float64)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be 1-D of one length, got shapes {mean.shape} and {std.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
            raise ValueError("mean and std must be finite, std >= 0 (statistics of at least two rows)")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_statistics(cls, stats: "FederatedStatistics") -> "Standardizer":
        """The standardiser of federated statistics (their mean and sample std)."""
        return cls(stats.mean, stats.std)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        rows = x.reshape(len(x), -1)
        if rows.shape[1] != len(self.mean):
            raise ValueError(f"data has {rows.shape[1]} features per row, the standardiser {len(self.mean)}")
        out = (rows - self.mean) / np.where(self.std > 0, self.std, 1.0)
        return out.reshape(x.shape).astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)

    def apply(self, data: FederatedDataset) -> FederatedDataset:
        """`data` with every client's inputs, their held-out inputs and the central test inputs standardised."""
        def each(part: dict | None) -> dict | None:
            return None if part is None else {cid: (self(x), y) for cid, (x, y) in part.items()}

        return replace(data, clients=each(data.clients), test=(self(data.test[0]), data.test[1]),
                       client_test=each(data.client_test))
