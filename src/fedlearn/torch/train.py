"""Local training and evaluation loops shared by `TorchClient` and server-side evaluation."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..types import Metrics, State
from .adapters import load_state

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_local(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    generator: torch.Generator | None = None,
    work_fraction: float = 1.0,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Mini-batch SGD for `epochs` passes (or `work_fraction` of those steps, for a straggler).

    With `proximal_mu` > 0 the FedProx term mu/2 * ||w - w_global||^2 is added to the objective, as its
    gradient mu * (w - w_global). `generator` seeds the shuffle; None keeps the data order.
    Returns the mean training loss over the steps taken and the step count.
    """
    n = x.shape[0]
    per_epoch = math.ceil(n / batch_size)
    steps = max(1, math.floor(work_fraction * epochs * per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    total, done = torch.zeros(()), 0
    while done < steps:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        p.grad.add_(p - a, alpha=proximal_mu)
            opt.step()
            total += loss.detach()
            done += 1
            if done == steps:
                break
    return {"train_loss": float(total) / steps, "steps": float(steps)}


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Mean loss and accuracy of `model` on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(loss_fn(out, target, reduction="sum"))
        correct += int((out.argmax(dim=1) == target).sum())
    n = max(1, x.shape[0])
    return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": float(x.shape[0])}


def central_evaluator(
    model_fn: Callable[[], torch.nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
) -> Callable[[State], Metrics]:
    """Server-side evaluation on a held-out set: returns `state -> {loss, accuracy, num_examples}`."""
    model = model_fn()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)

    def evaluate(state: State) -> Metrics:
        load_state(model, state)
        return evaluate_model(model, xt, yt, loss_fn=loss_fn)

    return evaluate
