"""Small reference models for the built-in tasks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Fully connected ReLU network: in_features -> hidden... -> num_classes."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(nn.Flatten(), *layers)


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression (the model of the FedProx Synthetic experiments)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, num_classes))


def build_model(name: str, in_features: int, num_classes: int) -> torch.nn.Module:
    """Construct a reference model by name ("mlp", "logreg")."""
    if name == "mlp":
        return MLP(in_features, num_classes)
    if name == "logreg":
        return LogisticRegression(in_features, num_classes)
    raise ValueError(f"unknown model {name!r}; choose 'mlp' or 'logreg'")
