"""Move parameters between a `torch.nn.Module` and a numpy model state."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

import numpy as np
import torch

from ..types import State


def state_of(model: torch.nn.Module, names: Collection[str] | None = None) -> State:
    """Copy a module's parameters and buffers (or only those in `names`, in the module's order) into an
    ordered numpy state."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items()
                       if names is None or k in names)


def load_state(model: torch.nn.Module, state: State, *, partial: bool = False) -> None:
    """Overwrite a module's parameters and buffers from a numpy state (names and shapes must match).

    With `partial`, `state` may hold a subset of the module's entries (in the module's order): only those
    are overwritten. Personalised and adapter-only models federate such a subset."""
    own = model.state_dict()
    expected = [k for k in own if k in state] if partial else list(own)
    if expected != list(state):
        raise ValueError(f"state names {list(state)[:5]}... do not match the model's {expected[:5]}...")
    with torch.no_grad():
        for name in expected:
            tensor = own[name]
            value = np.asarray(state[name])
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"parameter {name!r}: state has shape {value.shape}, model expects {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(value))


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that train (`requires_grad`): what an adapter-only model federates."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
