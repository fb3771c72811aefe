"""A cohort's forward pass without vmap, for the layers small federated models are made of: every client's
weights applied at once, a convolution as one grouped convolution over the cohort stacked into channels,
a linear layer as one batched matrix product.

Images travel as (batch, clients * channels, height, width) in channels-last memory, so client k's
channels are group k of each convolution and ReLU and max pooling act per channel as they would per client;
flattening turns them into (clients, batch, features) in each client's own (channels, height, width)
order, which linear layers take. On one CPU thread this runs a cohort of the FEMNIST CNN about twice as
fast as vmap of `functional_call` (which also groups convolutions, but in the default memory layout and
through vmap's per-operation dispatch); `benchmarks/simulation.py --task femnist` measures it.
Any other module (or a `Sequential` subclass with its own `forward`) gets None, and the caller uses vmap.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

Forward = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
_LAYERS = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear)


def grouped_forward(model: nn.Module, frozen: Mapping[str, torch.Tensor]) -> Forward | None:
    """`forward(params, x)`: the outputs (K, B, ...) of `model` for inputs x (K, B, *sample) with client k's
    parameters params[name][k] (a name missing from `params` takes the shared value in `frozen`); None when
    `model` is not a plain `nn.Sequential` of Conv2d, ReLU, MaxPool2d, Flatten (of all sample dimensions)
    and Linear layers."""
    if type(model).forward is not nn.Sequential.forward:
        return None
    layers = list(model.named_children())
    for _, layer in layers:
        if type(layer) not in _LAYERS:
            return None
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                             or isinstance(layer.padding, str)):
            return None
        if isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
            return None

    def forward(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[:2]

        def weight(name: str) -> torch.Tensor | None:
            if name in params:
                return params[name]
            shared = frozen.get(name)
            return None if shared is None else shared.expand(k, *shared.shape)

        images = x.dim() == 5  # (K, B, C, H, W): becomes (B, K * C, H, W)
        h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:]).contiguous(memory_format=torch.channels_last) \
            if images else x
        for name, layer in layers:
            if isinstance(layer, nn.Conv2d):
                if not images:
                    raise ValueError("a convolution after flattening")
                w, bias = weight(f"{name}.weight"), weight(f"{name}.bias")
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                             layer.stride, layer.padding, layer.dilation, groups=k)
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            elif isinstance(layer, nn.MaxPool2d):
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                 ceil_mode=layer.ceil_mode)
            elif isinstance(layer, nn.Flatten):
                if images:  # (B, K * C, H, W) -> (K, B, C * H * W), each client's features in C, H, W order
                    h = h.reshape(b, k, -1, *h.shape[2:]).transpose(0, 1).reshape(k, b, -1)
                    images = False
                else:
                    h = h.reshape(k, b, -1)
            else:
                if images:
                    raise ValueError("a linear layer on images")
                w, bias = weight(f"{name}.weight"), weight(f"{name}.bias")
                h = torch.bmm(h, w.transpose(1, 2)) if bias is None else torch.baddbmm(bias[:, None, :], h,
                                                                                      w.transpose(1, 2))
        if images:  # the model ends on images: back to (K, B, C, H, W)
            h = h.reshape(b, k, -1, *h.shape[2:]).transpose(0, 1)
        return h

    return forward
