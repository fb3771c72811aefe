"""Which codec carries a run's updates: the compression transform's, else the model's own dtype."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..params import Layout
from ..transforms.base import Transform
from .codecs import DenseCodec, model_dtype
from .transforms import Compression


def update_codec(transforms: Sequence[Transform], layout: Layout) -> Any:
    """The codec for updates of a model with `layout` under `transforms` (the client's and the server's
    chains agree, so both sides pick the same one)."""
    for transform in transforms:
        if isinstance(transform, Compression):
            return transform.wire_codec(layout.size)
    return DenseCodec(layout.size, model_dtype(layout))
