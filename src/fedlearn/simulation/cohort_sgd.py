"""Local SGD of a whole cohort at once: one model's parameters stacked along a client axis and trained on
padded per-client batches, the forward pass batched over clients: as grouped layers (`grouped.py`) for a plain
`Sequential` of convolutions, pooling and linear layers, else by `torch.func` (vmap of `functional_call`).

Every client gets exactly the batches `train_local` would draw for it (`batch_indices` with its own
generator: the same permutations, cut the same way, laid out for the whole cohort at once by `_schedule`).
Padding slots carry a zero mask, so a client's gradient is the mean over its real samples only, and each
client stops after its own number of steps; a step is only as wide as its longest real batch (a cohort of
clients holding two samples each does not pay for batches of 16). Clients are sorted by step count, so those
still training at any step are a prefix of the stack: finished clients cost nothing, and no Python loop runs
per client or per parameter inside a step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, vmap

from ..torch.train import LossFn
from .grouped import grouped_forward


@dataclass(frozen=True)
class Member:
    """One client of a cohort: its training data, how many SGD steps it takes, and its shuffle seed
    (None keeps the data order)."""

    x: torch.Tensor
    y: torch.Tensor
    steps: int
    seed: int | None


@dataclass(frozen=True)
class SGDSettings:
    """The SGD hyper-parameters a cohort shares (what `train_local` takes besides data and schedule)."""

    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0


def train_cohort(
    model: torch.nn.Module,
    start: Mapping[str, torch.Tensor],
    members: Sequence[Member],
    sgd: SGDSettings,
    loss_fn: LossFn,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train every member from the same `start` parameters (name -> tensor; the model's trainable ones).

    Returns the final parameters stacked in member order (name -> (K, *shape)) and each member's training
    loss summed over its steps (float32, accumulated as `train_local` does). `model` only lends its
    structure to `functional_call`; parameters it has that are missing from `start` are used as they are
    (frozen). Raises whatever torch raises for a model it cannot batch (random layers such as dropout,
    in-place buffer updates) or a loss without ``reduction="none"``.
    """
    steps = torch.tensor([m.steps for m in members])
    order = torch.argsort(steps, descending=True, stable=True)
    ranked = [members[i] for i in order.tolist()]
    x, y, index, mask = _schedule(ranked, sgd.batch_size)
    k_all = len(ranked)
    active = [(steps > t).sum().item() for t in range(int(steps.max()))]  # clients still training at step t
    widths = mask.sum(2).amax(0).int().tolist()  # the longest real batch at step t: the slots beyond are padding
    names = list(start)
    params = [start[n].detach().expand(k_all, *start[n].shape).clone() for n in names]
    anchors = [start[n].detach().expand(k_all, *start[n].shape) for n in names]
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in start}
    buffers: list[torch.Tensor] | None = None
    totals = torch.zeros(k_all)

    forward = grouped_forward(model, frozen) or \
        vmap(lambda own, xb: functional_call(model, (own, frozen), (xb,)), randomness="error")
    model.train()
    for t, k in enumerate(active):
        live = [p[:k] for p in params]
        leaves = [p.detach().requires_grad_() for p in live]  # same storage: the update below writes params
        batch, weights = index[:k, t, : widths[t]], mask[:k, t, : widths[t]]
        losses = _masked_means(loss_fn, forward(dict(zip(names, leaves)), x[batch]), y[batch], weights)
        grads = list(torch.autograd.grad(losses.sum(), leaves))  # client k's loss depends on its slice only
        with torch.no_grad():
            if sgd.proximal_mu > 0:
                torch._foreach_add_(grads, torch._foreach_sub(live, [a[:k] for a in anchors]), alpha=sgd.proximal_mu)
            if sgd.weight_decay != 0:
                grads = torch._foreach_add(grads, live, alpha=sgd.weight_decay)
            if sgd.momentum != 0:
                if buffers is None:  # every client takes its first step at t = 0
                    buffers = [g.clone() for g in grads]
                else:
                    torch._foreach_mul_([b[:k] for b in buffers], sgd.momentum)
                    torch._foreach_add_([b[:k] for b in buffers], grads, alpha=1)
                grads = [b[:k] for b in buffers]
            torch._foreach_add_(live, grads, alpha=-sgd.lr)
            totals[:k] += losses.detach()
    if bool((order == torch.arange(k_all)).all()):  # members came sorted (as the vectorized pool sends them)
        return dict(zip(names, params)), totals
    restore = torch.argsort(order)
    return {n: p[restore] for n, p in zip(names, params)}, totals[restore]


def _masked_means(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-client `loss_fn` with mean reduction over each client's real samples: outputs (K, B, ...) and
    targets (K, B, ...) are flattened to one batch, per-element losses masked by `weights` (K, B)."""
    k, b = weights.shape
    per = loss_fn(out.reshape(k * b, *out.shape[2:]), y.reshape(k * b, *y.shape[2:]), reduction="none")
    per = per.reshape(k, b, -1)
    return (per * weights[:, :, None]).sum((1, 2)) / (weights.sum(1) * per.shape[2])


def _schedule(members: Sequence[Member], batch_size: int) -> tuple[torch.Tensor, ...]:
    """All members' data concatenated, and per (member, step, slot) the row of that data and a 0/1 mask.

    The rows are those `batch_indices` yields (one `torch.randperm` per member and epoch from the member's
    seeded generator; batches never cross an epoch, the last of each may be short), laid out for the whole
    cohort by array arithmetic: member k's step t is batch t % nb_k of epoch t // nb_k, and its slot j holds
    position (t % nb_k) * batch_size + j of that epoch's permutation when that is below n_k. A padding slot
    points at the member's first sample, so every gathered row is real data."""
    x = torch.cat([m.x for m in members])
    y = torch.cat([m.y for m in members])
    sizes = np.array([m.x.shape[0] for m in members])
    steps = np.array([m.steps for m in members])
    per_epoch = -(-sizes // batch_size)                      # batches per epoch
    epochs = -(-steps // per_epoch)                          # epochs begun
    generator = torch.Generator()
    perms = []
    for m, n, e in zip(members, sizes.tolist(), epochs.tolist()):
        if m.seed is None:
            perms.extend([torch.arange(n)] * e)
        else:
            generator.manual_seed(m.seed)  # a reseeded generator draws what a fresh one seeded alike draws
            perms.extend(torch.randperm(n, generator=generator) for _ in range(e))
    flat = torch.cat(perms).numpy()
    perm_start = np.cumsum(np.r_[0, sizes * epochs])[:-1]   # where member k's first permutation begins in flat
    data_start = np.cumsum(np.r_[0, sizes])[:-1]            # where member k's rows begin in x
    t = np.arange(steps.max())[None, :, None]
    pos = (t % per_epoch[:, None, None]) * batch_size + np.arange(batch_size)[None, None, :]
    valid = (pos < sizes[:, None, None]) & (t < steps[:, None, None])
    where = perm_start[:, None, None] + (t // per_epoch[:, None, None]) * sizes[:, None, None] + pos
    index = np.where(valid, flat[np.where(valid, where, 0)], 0) + data_start[:, None, None]
    mask_dtype = x.dtype if x.is_floating_point() else torch.float32
    return x, y, torch.from_numpy(index), torch.from_numpy(valid).to(mask_dtype)
