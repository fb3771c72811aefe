"""Test helpers for privacy and secure aggregation: clients whose update is a fixed, known vector, so
what the server computes can be checked against a hand computation."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fedlearn import Client, Update
from fedlearn.types import Config, State


def known_delta(cid: str, dim: int, scale: float = 0.5) -> np.ndarray:
    """Client `cid`'s update: uniform in [-scale, scale], fixed by its id."""
    return np.random.default_rng(int(cid)).uniform(-scale, scale, dim)


class VectorClient(Client):
    """Returns `known_delta(cid, dim, scale)` as its update, whatever the model."""

    def __init__(self, cid: str, dim: int, scale: float = 0.5) -> None:
        super().__init__(cid)
        self.dim, self.scale = dim, scale

    def fit(self, state: State, config: Config) -> Update:
        return Update(self.cid, int(config["round"]), known_delta(self.cid, self.dim, self.scale), 10,
                      {"train_loss": 1.0})


def zero_state(dim: int) -> State:
    return OrderedDict(w=np.zeros(dim))
