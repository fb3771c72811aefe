"""Local training and evaluation loops shared by `TorchClient` and server-side evaluation."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..metrics import classification_metrics
from ..params import Layout
from ..types import Metrics, State
from .adapters import load_state

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GradHook = Callable[[list[torch.nn.Parameter]], None]


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
    proximal_anchor: list[torch.Tensor] | None = None,
    grad_hook: GradHook | None = None,
) -> dict[str, float]:
    """Mini-batch SGD for `epochs` passes (or `work_fraction` of those steps, for a straggler).

    With `proximal_mu` > 0 the FedProx term mu/2 * ||w - w_global||^2 is added to the objective, as its
    gradient mu * (w - w_global); w_global is the starting point, or `proximal_anchor` (one tensor per trainable
    parameter) when training starts elsewhere (Ditto's personal model is pulled towards the global one).
    `grad_hook(params)` runs after each backward pass, before the proximal term
    and the step, on the trainable parameters in `model.parameters()` order; it may read or change their
    gradients (SCAFFOLD's drift correction). `generator` seeds the shuffle; None keeps the data order.
    Returns the mean training loss over the steps taken and the step count.
    """
    steps = local_steps(x.shape[0], batch_size, epochs, work_fraction)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = None
    if proximal_mu > 0:
        anchor = proximal_anchor if proximal_anchor is not None else [p.detach().clone() for p in params]
        if len(anchor) != len(params):
            raise ValueError(f"proximal_anchor has {len(anchor)} tensors for {len(params)} trainable parameters")
    opt = LocalSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    total = torch.zeros(())
    for idx in batch_indices(x.shape[0], batch_size, steps, generator):
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if grad_hook is not None:
            grad_hook(params)
        if anchor is not None:
            with torch.no_grad():
                torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, anchor), alpha=proximal_mu)
        opt.step()
        total += loss.detach()
    return {"train_loss": float(total) / steps, "steps": float(steps)}


def local_steps(n: int, batch_size: int, epochs: int, work_fraction: float = 1.0) -> int:
    """Number of SGD steps of local training: `epochs` passes of ceil(n / batch_size) batches, cut to
    `work_fraction` of that for a straggler (at least one step)."""
    return max(1, math.floor(work_fraction * epochs * math.ceil(n / batch_size)))


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Sample indices of each of `steps` mini-batches: every epoch draws `torch.randperm(n, generator)` (or keeps
    the data order when `generator` is None) and cuts it into consecutive batches, the last one possibly short.
    Every engine that must reproduce `train_local` takes its batches from here, except the cohort engine, which
    lays out the same batches for a whole cohort at once (`cohort_sgd._schedule`, pinned to this by a test)."""
    done = 0
    while True:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
            done += 1
            if done == steps:
                return


class LocalSGD:
    """Mini-batch SGD with momentum and weight decay, computing exactly what `torch.optim.SGD` computes on CPU
    (same operations in the same order; parameters without a gradient are skipped) but as a few foreach calls:
    no per-step hooks or bookkeeping, and no import of torch's compiler stack, which `torch.optim` pulls in
    on first use (a second of start-up)."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: dict[int, torch.Tensor] = {}  # parameter position -> momentum buffer

    def grads(self) -> list[torch.Tensor]:
        """The gradients of the parameters that have one."""
        return [p.grad for p in self.params if p.grad is not None]

    def zero_grad(self) -> None:
        """Zero existing gradients in place, as `Optimizer.zero_grad(set_to_none=False)` does."""
        grads = self.grads()
        if grads:
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if self.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum != 0:
            old = [k for k, i in enumerate(live) if i in self.buffers]
            if old:
                buffers = [self.buffers[live[k]] for k in old]
                torch._foreach_mul_(buffers, self.momentum)
                torch._foreach_add_(buffers, [grads[k] for k in old], alpha=1)
            for k, i in enumerate(live):
                self.buffers.setdefault(i, grads[k].detach().clone())
            grads = [self.buffers[i] for i in live]
        torch._foreach_add_(params, grads, alpha=-self.lr)


class GradientCorrection:
    """A `grad_hook` that adds a fixed flat vector to every local gradient and records the mean raw gradient.

    This is SCAFFOLD's client half (Karimireddy et al. 2020): the correction c - c_i goes in, and the mean of
    the uncorrected loss gradients over the local steps (the client's new control variate c_i, option II of
    the paper) comes out. Both are flat vectors in the model state's `Layout` order (a scalar correction
    applies to every entry); entries of buffers (no gradient) are ignored on the way in and zero on the way out.
    """

    def __init__(self, model: torch.nn.Module, layout: Layout, correction: np.ndarray | float) -> None:
        correction = np.asarray(correction, dtype=np.float64)
        if correction.shape not in ((), (layout.size,)):
            raise ValueError(f"gradient_correction must be a scalar or a flat vector of the model's size "
                             f"({layout.size},), got shape {correction.shape}")
        per_name = layout.unflatten(np.broadcast_to(correction, (layout.size,)))
        self.layout = layout
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        unknown = [name for name in self.names if name not in per_name]
        if unknown:
            raise ValueError(f"trainable parameters {unknown} are not in the model state's layout")
        self.offsets = [torch.from_numpy(per_name[name]) for name in self.names]
        self.sums: list[torch.Tensor] | None = None
        self.steps = 0

    def __call__(self, params: list[torch.nn.Parameter]) -> None:
        if self.sums is None:
            self.sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for p, total, offset in zip(params, self.sums, self.offsets):
            if p.grad is not None:
                total.add_(p.grad)
                p.grad.add_(offset)
        self.steps += 1

    def mean_gradient(self) -> np.ndarray:
        """Mean uncorrected gradient over the steps taken, as a flat float64 vector."""
        if self.sums is None:
            raise RuntimeError("no local step was taken, so there is no mean gradient")
        state = OrderedDict((n, np.zeros(s)) for n, s in zip(self.layout.names, self.layout.shapes))
        for name, total in zip(self.names, self.sums):
            state[name] = total.numpy() / self.steps
        return self.layout.flatten(state)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Mean loss of `model` on (x, y), and for a classifier (outputs of shape (n, classes)) the metrics of
    `fedlearn.metrics.classification_metrics`: accuracy, balanced accuracy, F1, AUC, per-class report."""
    model.eval()
    loss_sum, outputs = 0.0, []
    for start in range(0, x.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        loss_sum += float(loss_fn(out, y[start : start + batch_size], reduction="sum"))
        outputs.append(out)
    n = max(1, x.shape[0])
    metrics = {"loss": loss_sum / n, "num_examples": float(x.shape[0])}
    if outputs and outputs[0].ndim == 2 and not y.is_floating_point():
        metrics.update(classification_metrics(torch.cat(outputs).numpy(), y.numpy()))
    return metrics


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
        load_state(model, state, partial=True)  # an adapter-only global state leaves the frozen rest as built
        return evaluate_model(model, xt, yt, loss_fn=loss_fn)

    return evaluate
