"""Label flipping: malicious clients train honestly on wrong labels (class c becomes num_classes - 1 - c)."""
from __future__ import annotations

import numpy as np

from .base import Arrays, Attack


class LabelFlip(Attack):
    """A data attack: the update looks like any other, only what it learned is wrong."""

    name = "label_flip"

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int, rng: np.random.Generator) -> Arrays:
        return x, (num_classes - 1 - y).astype(y.dtype)
