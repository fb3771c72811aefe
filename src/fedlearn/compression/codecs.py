"""Wire codecs for a flat update: how the delta a client sends is laid out as tensors, and the strict decoder
the server runs on what a client sent.

A codec's `encode` takes the dense float64 vector a compression transform's client half produced (values on
the codec's grid: model dtype, k-bit levels times block scales, or k non-zeros) and packs it; `decode` turns
the packed tensors back into exactly that float64 vector, refusing anything a well-behaved encoder could not
have produced (wrong sizes, out-of-range indices, duplicate indices, non-finite scales or values) with a
`SerializationError`. Decoding never trusts a size the client claims: every size comes from the codec's own
settings and the model's layout.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..params import Layout
from ..serialize import SerializationError

BF16 = "bfloat16"
DENSE_DTYPES = ("float64", "float32", "float16", BF16)


def model_dtype(layout: Layout) -> str:
    """The widest floating dtype of a model (float32 for a model without floating parameters)."""
    floats = [np.dtype(d) for d in layout.dtypes if np.dtype(d).kind == "f"]
    return str(max(floats, key=lambda d: d.itemsize)) if floats else "float32"


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float64."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` rounded to `dtype` and back to float64: exactly what a dense codec of that dtype delivers."""
    if dtype == BF16:
        return from_bf16_bits(to_bf16_bits(x))
    return np.asarray(x).astype(dtype).astype(np.float64)


def _get(tensors: Mapping[str, np.ndarray], name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    value = tensors.get(name)
    if value is None:
        raise SerializationError(f"compressed update lacks tensor {name!r}")
    if value.dtype != np.dtype(dtype) or value.shape != shape:
        raise SerializationError(f"compressed update tensor {name!r} is {value.dtype} {value.shape}, "
                                 f"expected {np.dtype(dtype)} {shape}")
    return value


def _only(tensors: Mapping[str, np.ndarray], names: set[str]) -> None:
    extra = set(tensors) - names
    if extra:
        raise SerializationError(f"compressed update carries unexpected tensors {sorted(extra)}")


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(x).all():
        raise SerializationError(f"compressed update has non-finite {what}")
    return x


class DenseCodec:
    """The delta as one vector in `dtype` (the model's own by default; float16 / bfloat16 to halve it)."""

    def __init__(self, size: int, dtype: str = "float32") -> None:
        if dtype not in DENSE_DTYPES:
            raise ValueError(f"dense wire dtype must be one of {DENSE_DTYPES}, got {dtype!r}")
        self.size, self.dtype = size, dtype
        self.name = f"dense-{dtype}"

    def encode(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": to_bf16_bits(vector) if self.dtype == BF16 else np.asarray(vector, dtype=self.dtype)}

    def decode(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        _only(tensors, {"values"})
        if self.dtype == BF16:
            return _finite(from_bf16_bits(_get(tensors, "values", "uint16", (self.size,))), "values")
        return _finite(_get(tensors, "values", self.dtype, (self.size,)).astype(np.float64), "values")


class QuantizedCodec:
    """`bits`-bit level codes (packed) and one float32 scale per block of `block` coordinates: coordinate i
    of block b is ``scale[b] * (2 * code[i] / (2**bits - 1) - 1)``."""

    def __init__(self, size: int, bits: int, block: int) -> None:
        if not 1 <= bits <= 8 or block < 1:
            raise ValueError(f"quantisation needs 1 <= bits <= 8 and block >= 1, got bits={bits}, block={block}")
        self.size, self.bits, self.block = size, bits, block
        self.blocks = math.ceil(size / block)
        self.name = f"qsgd-{bits}b-{block}"

    def dequantize(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        levels = 2**self.bits - 1
        per_coord = np.repeat(scales.astype(np.float64), self.block)[: self.size]
        return per_coord * (2.0 * codes.astype(np.float64) / levels - 1.0)

    def quantize(self, vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unbiased stochastic rounding of each coordinate to one of the 2**bits grid points of its block
        (QSGD-style): E[result] = vector, up to float32 rounding of each block's largest coordinate."""
        codes, scales = self._codes(vector, rng)
        return self.dequantize(codes, scales)

    def _codes(self, vector: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """Grid codes and block scales; `rng` None rounds to the nearest grid point (exact for on-grid input)."""
        scales = block_scales(vector, self.block)
        per_coord = np.repeat(scales.astype(np.float64), self.block)[: self.size]
        safe = np.where(per_coord > 0, per_coord, 1.0)
        position = (np.clip(vector / safe, -1.0, 1.0) + 1.0) * (2**self.bits - 1) / 2.0
        if rng is None:
            return np.rint(position), scales
        low = np.floor(position)
        return low + (rng.random(self.size) < position - low), scales

    def encode(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Pack a vector already on the grid (what `quantize` returned): codes and scales are read back exactly."""
        codes, scales = self._codes(vector, None)
        bits = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - self.bits:]
        return {"codes": np.packbits(bits.reshape(-1)), "scales": scales}

    def decode(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        _only(tensors, {"codes", "scales"})
        packed = _get(tensors, "codes", "uint8", (math.ceil(self.size * self.bits / 8),))
        scales = _finite(_get(tensors, "scales", "float32", (self.blocks,)), "scales")
        if (scales < 0).any():
            raise SerializationError("compressed update has negative block scales")
        bits = np.unpackbits(packed)[: self.size * self.bits].reshape(self.size, self.bits)
        codes = np.packbits(np.pad(bits, ((0, 0), (8 - self.bits, 0))), axis=1)[:, 0]
        return self.dequantize(codes, scales)


def block_scales(vector: np.ndarray, block: int) -> np.ndarray:
    """Per-block max |x| as float32, rounded down: the block's largest coordinate is clipped to it (a change
    below float32 rounding, as the dense wire makes anyway), so it lands exactly on an end of the grid and
    the scale can be read back from the dequantised vector."""
    padded = np.zeros(math.ceil(len(vector) / block) * block)
    padded[: len(vector)] = np.abs(vector)
    exact = padded.reshape(-1, block).max(axis=1)
    scales = exact.astype(np.float32)
    high = scales.astype(np.float64) > exact
    scales[high] = np.nextafter(scales[high], np.float32(0))
    return scales


class SparseCodec:
    """At most `k` non-zeros: strictly increasing uint32 indices and their values in `dtype`."""

    def __init__(self, size: int, k: int, dtype: str = "float32") -> None:
        if not 1 <= k <= size:
            raise ValueError(f"sparse codec needs 1 <= k <= size ({size}), got {k}")
        self.size, self.k, self.values = size, k, DenseCodec(k, dtype)
        self.name = f"sparse-{k}-{dtype}"

    def encode(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.flatnonzero(vector)
        if len(idx) > self.k:
            raise ValueError(f"vector has {len(idx)} non-zeros, the sparse codec carries at most {self.k}")
        return {"indices": idx.astype(np.uint32), "values": self.values.encode(vector[idx])["values"]}

    def decode(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        _only(tensors, {"indices", "values"})
        idx = tensors.get("indices")
        if idx is None or idx.dtype != np.uint32 or idx.ndim != 1 or len(idx) > self.k:
            raise SerializationError(f"compressed update needs at most {self.k} uint32 indices")
        if len(idx) and (int(idx[-1]) >= self.size or (np.diff(idx.astype(np.int64)) <= 0).any()):
            raise SerializationError(f"sparse indices must be strictly increasing and below {self.size}")
        codec = DenseCodec(len(idx), self.values.dtype)
        out = np.zeros(self.size)
        out[idx] = codec.decode({"values": tensors.get("values", np.zeros(0, np.uint8))})
        return out
