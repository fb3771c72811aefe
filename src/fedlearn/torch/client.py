"""`TorchClient`: a complete client for a PyTorch model on in-memory data, in about ten lines of use."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from ..client import Client
from ..params import Layout
from ..types import Config, Metrics, State, Update
from .adapters import load_state, state_of
from .train import GradientCorrection, LossFn, evaluate_model, train_local


class TorchClient(Client):
    """Trains `model_fn()` on (x, y) with mini-batch SGD and returns the parameter change.

    Config from the server overrides the local defaults per round (``local_epochs``, ``lr``,
    ``batch_size``); ``work_fraction`` and ``proximal_mu`` come from the pool and the strategy. A flat
    ``gradient_correction`` (SCAFFOLD) is added to every local gradient, and the update then carries the
    mean uncorrected gradient as ``extras["mean_gradient"]``.
    Evaluation uses (x_test, y_test) when given, else the training data.
    `class_weights` (one positive number per class) weight the training loss, as ``weight=`` of cross
    entropy does, so that rare classes count more on an imbalanced task; evaluation stays unweighted.
    """

    def __init__(
        self,
        cid: str,
        model_fn: Callable[[], torch.nn.Module],
        x: np.ndarray,
        y: np.ndarray,
        *,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
        loss_fn: LossFn = torch.nn.functional.cross_entropy,
        local_epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        shuffle: bool = True,
        class_weights: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        super().__init__(cid)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"client {cid!r}: x and y must be non-empty and of equal length ({len(x)} vs {len(y)})")
        self.model_fn = model_fn
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)
        has_test = x_test is not None and y_test is not None
        self.x_test = torch.as_tensor(x_test) if has_test else self.x
        self.y_test = torch.as_tensor(y_test) if has_test else self.y
        self.loss_fn = loss_fn
        self.class_weights = None if class_weights is None else _checked_weights(cid, class_weights)
        self.train_loss_fn = loss_fn if self.class_weights is None else partial(loss_fn, weight=self.class_weights)
        self.defaults = {"local_epochs": local_epochs, "batch_size": batch_size, "lr": lr,
                         "momentum": momentum, "weight_decay": weight_decay}
        self.shuffle = shuffle
        self._model: torch.nn.Module | None = None

    def model(self, state: State) -> torch.nn.Module:
        """The client's module (built once) loaded with `state`. A state that holds only some of the module's
        entries (a LoRA model's adapters and head, a FedPer body) overwrites just those: the rest keeps its
        values, and only the entries in `state` are trained into the update."""
        if self._model is None:
            self._model = self.model_fn()
        load_state(self._model, state, partial=True)
        return self._model

    def model_layout(self) -> Layout:
        """The layout of `model_fn()`'s state."""
        if self._model is None:
            self._model = self.model_fn()
        return Layout.of(state_of(self._model))

    def sgd_settings(self, config: Config) -> dict[str, Any]:
        """This round's `train_local` settings: local defaults overridden by the server's `config`, plus the
        pool's ``work_fraction`` and the strategy's ``proximal_mu``."""
        opts = {**self.defaults, **{k: config[k] for k in self.defaults if k in config}}
        return {"epochs": int(opts["local_epochs"]), "batch_size": int(opts["batch_size"]), "lr": float(opts["lr"]),
                "momentum": float(opts["momentum"]), "weight_decay": float(opts["weight_decay"]),
                "work_fraction": float(config.get("work_fraction", 1.0)),
                "proximal_mu": float(config.get("proximal_mu", 0.0))}

    def shuffle_seed(self, config: Config) -> int | None:
        """Seed of this round's shuffling generator, or None when the data keeps its order."""
        return int(config.get("seed", 0)) if self.shuffle else None

    def local_features(self) -> np.ndarray:
        """The training inputs as rows of flat features, for federated statistics."""
        return self.x.reshape(len(self.x), -1).numpy()

    def fit(self, state: State, config: Config) -> Update:
        settings = self.sgd_settings(config)
        model = self.model(state)
        seed = self.shuffle_seed(config)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        layout = Layout.of(state)
        correction = config.get("gradient_correction")
        drift = GradientCorrection(model, layout, correction) if correction is not None else None
        metrics = train_local(model, self.x, self.y, **settings, loss_fn=self.train_loss_fn, generator=generator,
                              grad_hook=drift)
        delta = layout.flatten(state_of(model, state.keys())) - layout.flatten(state)
        extras = {"mean_gradient": drift.mean_gradient()} if drift is not None else {}
        return Update(self.cid, int(config.get("round", 0)), delta, len(self.x), metrics,
                      partial=settings["work_fraction"] < 1.0, extras=extras)

    def evaluate(self, state: State, config: Config) -> Metrics:
        return evaluate_model(self.model(state), self.x_test, self.y_test, loss_fn=self.loss_fn)


def _checked_weights(cid: str, weights: Sequence[float] | np.ndarray) -> torch.Tensor:
    """Class weights as a float32 tensor: one positive finite number per class."""
    values = np.asarray(weights, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"client {cid!r}: class_weights must be one positive number per class, got {weights!r}")
    return torch.as_tensor(values, dtype=torch.float32)
