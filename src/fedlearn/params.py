"""`Layout`: the names, shapes and dtypes of a model state, and the map to and from one flat vector."""
from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

FLAT_DTYPE = np.float64


class LayoutError(ValueError):
    """A state or vector does not match the expected layout."""


@dataclass(frozen=True)
class Layout:
    """Ordered (name, shape, dtype) triples; `flatten` and `unflatten` are exact inverses."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> "Layout":
        """Describe the layout of a model state."""
        return cls(
            names=tuple(state.keys()),
            shapes=tuple(tuple(int(s) for s in np.shape(v)) for v in state.values()),
            dtypes=tuple(np.asarray(v).dtype.str for v in state.values()),
        )

    def restricted_to(self, names: "Collection[str]") -> "Layout":
        """The entries named in `names`, in this layout's order: the part of a client's model that a
        partial global state (LoRA adapters and head, a FedPer body) federates."""
        keep = [i for i, n in enumerate(self.names) if n in names]
        return Layout(tuple(self.names[i] for i in keep), tuple(self.shapes[i] for i in keep),
                      tuple(self.dtypes[i] for i in keep))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @functools.cached_property
    def size(self) -> int:
        """Length of the flat vector (computed once: the round loop asks for every update)."""
        return sum(self.sizes)

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate a state into one float64 vector, checking names and shapes."""
        self.check(state)
        out = np.empty(self.size, dtype=FLAT_DTYPE)
        pos = 0
        for name, n in zip(self.names, self.sizes):
            out[pos : pos + n] = np.asarray(state[name]).reshape(-1)
            pos += n
        return out

    def unflatten(self, vector: np.ndarray) -> "OrderedDict[str, np.ndarray]":
        """Split a flat vector back into a state with the original shapes and dtypes."""
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.shape[0] != self.size:
            raise LayoutError(f"flat vector has shape {vector.shape}, layout expects ({self.size},)")
        state: OrderedDict[str, np.ndarray] = OrderedDict()
        pos = 0
        for name, shape, dtype, n in zip(self.names, self.shapes, self.dtypes, self.sizes):
            state[name] = vector[pos : pos + n].astype(np.dtype(dtype)).reshape(shape)
            pos += n
        return state

    def check(self, state: Mapping[str, np.ndarray]) -> None:
        """Raise `LayoutError` unless `state` has exactly this layout's names and shapes."""
        if tuple(state.keys()) != self.names:
            missing = set(self.names) - set(state)
            extra = set(state) - set(self.names)
            raise LayoutError(
                f"state names do not match the layout (missing: {sorted(missing)}, unexpected: {sorted(extra)})"
            )
        for name, shape in zip(self.names, self.shapes):
            got = tuple(np.shape(state[name]))
            if got != shape:
                raise LayoutError(f"parameter {name!r} has shape {got}, layout expects {shape}")

    def to_json(self) -> str:
        return json.dumps({"names": self.names, "shapes": self.shapes, "dtypes": self.dtypes})

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        raw = json.loads(text)
        return cls(
            names=tuple(raw["names"]),
            shapes=tuple(tuple(int(x) for x in s) for s in raw["shapes"]),
            dtypes=tuple(raw["dtypes"]),
        )


def layout_difference(expected: Layout, got: Layout, *, here: str = "the server's model",
                      there: str = "the client's model") -> str | None:
    """None when `got` equals `expected`; else a sentence naming the first parameter where they differ
    (by position: name, shape or dtype), or the first one only one of them has."""
    for i, (name, shape, dtype, g_name, g_shape, g_dtype) in enumerate(zip(
            expected.names, expected.shapes, expected.dtypes, got.names, got.shapes, got.dtypes)):
        if name != g_name:
            return f"parameter #{i} is {name!r} in {here} but {g_name!r} in {there}"
        if shape != g_shape:
            return f"parameter {name!r} has shape {shape} in {here} but {g_shape} in {there}"
        if dtype != g_dtype:
            return f"parameter {name!r} has dtype {np.dtype(dtype)} in {here} but {np.dtype(g_dtype)} in {there}"
    if len(expected.names) > len(got.names):
        return f"parameter {expected.names[len(got.names)]!r} of {here} is missing in {there}"
    if len(got.names) > len(expected.names):
        return f"{there} has parameter {got.names[len(expected.names)]!r}, which {here} lacks"
    return None
