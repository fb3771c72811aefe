"""Model-replacement backdoor (Bagdasaryan et al. 2020) and its success metric.

Attackers stamp a trigger (a small bright square) on part of their training data, relabel those samples as
the target class, train on the mix, and boost the resulting update so that averaging with the honest updates
leaves (roughly) the attackers' backdoored model in place.

Where the trigger sits matters. On pixels that clean digits use (the default, inside the top of the digit),
honest training pushes back every round, so the boost is what plants the backdoor: the model-replacement
setting, where bounding norms defends. On pixels that are always blank (a corner), honest updates never
touch the weights the trigger drives, so any persistent minority plants it without boosting, and only rules
that ignore minorities coordinate by coordinate (median, Krum, FLTrust) stop it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..torch.adapters import load_state
from ..types import Metrics, State, Update
from .base import Arrays, Attack
from .model import positive


class Trigger:
    """A `size` x `size` square of `value` with its top-left pixel at (`row`, `col`), stamped into square
    images stored flat (digits: 8 x 8 pixels scaled to [0, 1], so 64 features)."""

    def __init__(self, size: int = 2, row: int = 2, col: int = 3, value: float = 1.0) -> None:
        if size < 1 or row < 0 or col < 0:
            raise ValueError(f"trigger size must be >= 1 and its row, col >= 0, got size {size} at ({row}, {col})")
        self.size, self.row, self.col, self.value = int(size), int(row), int(col), float(value)

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """A copy of `x` (n, features) with the trigger in every image."""
        side = math.isqrt(int(np.prod(x.shape[1:])))
        if side * side != np.prod(x.shape[1:]) or side < max(self.row, self.col) + self.size:
            raise ValueError(f"the backdoor trigger ({self.size}x{self.size} at row {self.row}, column {self.col}) "
                             f"needs square images that contain it (such as digits, 8x8); got samples of shape "
                             f"{x.shape[1:]}")
        images = x.reshape(len(x), side, side).copy()
        images[:, self.row : self.row + self.size, self.col : self.col + self.size] = self.value
        return images.reshape(x.shape)


class Backdoor(Attack):
    """Data half: a `poison_fraction` of each attacker's samples get the trigger and the `target` label.
    Model half: each attacker multiplies its delta by `boost`; `boost=None` uses n / f for n updates and
    f attackers in the round, the paper's gamma = n / eta with server learning rate eta = 1, shared by f."""

    name = "backdoor"

    def __init__(self, attackers: Iterable[str], seed: int = 0, target: int = 0, poison_fraction: float = 0.5,
                 boost: float | None = None, trigger_size: int = 2, trigger_row: int = 2,
                 trigger_col: int = 3) -> None:
        super().__init__(attackers, seed)
        if not 0 < poison_fraction <= 1:
            raise ValueError(f"backdoor poison_fraction must be in (0, 1], got {poison_fraction}")
        if target < 0:
            raise ValueError(f"backdoor target must be a class index >= 0, got {target}")
        self.target, self.poison_fraction = int(target), float(poison_fraction)
        self.boost = None if boost is None else positive("backdoor boost (omit it for n / f)", boost)
        self.trigger = Trigger(trigger_size, trigger_row, trigger_col)

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int, rng: np.random.Generator) -> Arrays:
        if self.target >= num_classes:
            raise ValueError(f"backdoor target {self.target} is not a class of this task (0..{num_classes - 1})")
        chosen = rng.choice(len(x), size=max(1, round(self.poison_fraction * len(x))), replace=False)
        x, y = x.copy(), y.copy()
        x[chosen] = self.trigger.stamp(x[chosen])
        y[chosen] = self.target
        return x, y

    def forge(self, malicious: list[Update], honest: list[Update], rnd: int) -> list[np.ndarray]:
        boost = self.boost if self.boost is not None else (len(malicious) + len(honest)) / len(malicious)
        return [boost * u.delta for u in malicious]

    def success_evaluator(
        self, model_fn: Callable[[], torch.nn.Module], x_test: np.ndarray, y_test: np.ndarray
    ) -> Callable[[State], Metrics]:
        """`state -> {"backdoor_success": ...}`: the fraction of test images not of the target class that the
        model assigns to the target once the trigger is stamped on them."""
        keep = y_test != self.target
        triggered = torch.as_tensor(self.trigger.stamp(x_test[keep]))
        model = model_fn()

        @torch.no_grad()
        def evaluate(state: State) -> Metrics:
            load_state(model, state)
            model.eval()
            return {"backdoor_success": float((model(triggered).argmax(dim=1) == self.target).float().mean())}

        return evaluate
