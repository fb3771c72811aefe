"""Move parameters between a `torch.nn.Module` and a numpy model state."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..types import State


def state_of(model: torch.nn.Module) -> State:
    """Copy a module's parameters and buffers into an ordered numpy state."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def load_state(model: torch.nn.Module, state: State) -> None:
    """Overwrite a module's parameters and buffers from a numpy state (names and shapes must match)."""
    own = model.state_dict()
    if list(own) != list(state):
        raise ValueError(f"state names {list(state)[:5]}... do not match the model's {list(own)[:5]}...")
    with torch.no_grad():
        for name, tensor in own.items():
            value = np.asarray(state[name])
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"parameter {name!r}: state has shape {value.shape}, model expects {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(value))
