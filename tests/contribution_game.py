"""A real federated round for contribution tests, in plain numpy so it is fast and independent of the code
under test: softmax regression on scikit-learn digits, clients with Dirichlet label skew each taking 20
local gradient steps from the same start, and a held-out validation set."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from sklearn.datasets import load_digits

from fedlearn.params import Layout
from fedlearn.types import Metrics, State, Update


class DigitsRound:
    def __init__(self, n: int, seed: int = 0) -> None:
        x, y = load_digits(return_X_y=True)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        x, y = x[order] / 16.0, y[order]
        self.x_val, self.y_val, x_train, y_train = x[:400], y[:400], x[400:], y[400:]
        self.state = OrderedDict(W=np.zeros((64, 10)), b=np.zeros(10))
        self.layout = Layout.of(self.state)
        self.params = self.layout.flatten(self.state)
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in range(10):
            ids = np.where(y_train == c)[0]
            cuts = (np.cumsum(rng.dirichlet([0.5] * n)) * len(ids)).astype(int)[:-1]
            for k, part in enumerate(np.split(ids, cuts)):
                parts[k] += list(part)
        self.updates = [self._train(str(k), x_train[p], y_train[p]) for k, p in enumerate(parts) if len(p) > 0]

    def _train(self, cid: str, x: np.ndarray, y: np.ndarray, steps: int = 20, lr: float = 0.5) -> Update:
        w, b, onehot = self.state["W"].copy(), self.state["b"].copy(), np.eye(10)[y]
        for _ in range(steps):
            p = _softmax(x @ w + b)
            w -= lr * x.T @ (p - onehot) / len(y)
            b -= lr * (p - onehot).mean(0)
        return Update(cid, 1, self.layout.flatten(OrderedDict(W=w, b=b)) - self.params, len(y))

    def evaluate(self, state: State) -> Metrics:
        logits = self.x_val @ state["W"] + state["b"]
        p = _softmax(logits)
        return {"accuracy": float((logits.argmax(1) == self.y_val).mean()),
                "loss": float(-np.log(p[np.arange(len(self.y_val)), self.y_val] + 1e-12).mean())}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
