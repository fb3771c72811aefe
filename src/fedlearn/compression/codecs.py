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

import hashlib
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

    def encode(self, vector: np.ndarray, key: str = "") -> dict[str, np.ndarray]:
        return {"values": to_bf16_bits(vector) if self.dtype == BF16 else np.asarray(vector, dtype=self.dtype)}

    def decode(self, tensors: Mapping[str, np.ndarray], key: str = "") -> np.ndarray:
        _only(tensors, {"values"})
        if self.dtype == BF16:
            return _finite(from_bf16_bits(_get(tensors, "values", "uint16", (self.size,))), "values")
        return _finite(_get(tensors, "values", self.dtype, (self.size,)).astype(np.float64), "values")


SCALE_DTYPES = ("float32", "float16")
KEEP_ALL = 1 << 64


class QuantizedCodec:
    """`bits`-bit level codes (packed) and one scale per block of `block` coordinates (float32, or float16 to
    halve that overhead): coordinate i of block b is ``scale[b] * (2 * code[i] / (2**bits - 1) - 1)``.

    With `fraction` < 1 only a random subset of the coordinates travels (random-k, each kept with probability
    `fraction`, rescaled by its inverse so the update stays unbiased); which ones is a pure function of the
    update's `key` (client id and round, which the server knows), so no index is sent: both sides compute the
    same mask (`keep_mask`, a splitmix64 hash: the same on every platform and numpy version)."""

    def __init__(self, size: int, bits: int, block: int, *, scale_dtype: str = "float32", fraction: float = 1.0) -> None:
        if not 1 <= bits <= 8 or block < 1:
            raise ValueError(f"quantisation needs 1 <= bits <= 8 and block >= 1, got bits={bits}, block={block}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"quantisation scales travel as one of {SCALE_DTYPES}, got {scale_dtype!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"the fraction of coordinates sent must be in (0, 1], got {fraction}")
        self.size, self.bits, self.block, self.scale_dtype = size, bits, block, scale_dtype
        # keep a coordinate when its 64-bit hash falls below `threshold`: probability threshold / 2**64 exactly
        self.threshold = min(KEEP_ALL, round(fraction * KEEP_ALL))
        self.keep_probability = self.threshold / KEEP_ALL
        self.name = f"qsgd-{bits}b-{block}" + (f"-{scale_dtype}" if scale_dtype != "float32" else "") + (
            f"-keep{fraction:g}" if fraction < 1 else "")

    def kept(self, key: str) -> np.ndarray | None:
        """Indices of the coordinates that travel for the update with `key` (None: all of them)."""
        return None if self.threshold == KEEP_ALL else np.flatnonzero(keep_mask(self.size, key, self.threshold))

    def dequantize(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        levels = 2**self.bits - 1
        per_coord = np.repeat(scales.astype(np.float64), self.block)[: len(codes)]
        return per_coord * (2.0 * codes.astype(np.float64) / levels - 1.0)

    def quantize(self, vector: np.ndarray, rng: np.random.Generator, key: str = "") -> np.ndarray:
        """Unbiased stochastic rounding of each travelling coordinate (divided by the keep probability) to
        one of the 2**bits grid points of its block (QSGD-style): E[result] = vector, exactly for 1 bit (the
        scale is rounded up to its wire dtype), up to the rounding of each block's largest coordinate to the
        scale's dtype for more bits."""
        kept = self.kept(key)
        values = vector if kept is None else vector[kept] / self.keep_probability
        codes, scales = self._codes(values, rng)
        return self._spread(self.dequantize(codes, scales), kept)

    def _spread(self, values: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
        if kept is None:
            return values
        out = np.zeros(self.size)
        out[kept] = values
        return out

    def _codes(self, values: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """Grid codes and block scales; `rng` None rounds to the nearest grid point (exact for on-grid input)."""
        scales = block_scales(values, self.block, self.scale_dtype, up=self.bits == 1)
        per_coord = np.repeat(scales.astype(np.float64), self.block)[: len(values)]
        safe = np.where(per_coord > 0, per_coord, 1.0)
        position = (np.clip(values / safe, -1.0, 1.0) + 1.0) * (2**self.bits - 1) / 2.0
        if rng is None:
            return np.rint(position), scales
        low = np.floor(position)
        return low + (rng.random(len(values)) < position - low), scales

    def encode(self, vector: np.ndarray, key: str = "") -> dict[str, np.ndarray]:
        """Pack a vector already on the grid (what `quantize` returned): codes and scales are read back exactly."""
        kept = self.kept(key)
        codes, scales = self._codes(vector if kept is None else vector[kept], None)
        bits = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - self.bits:]
        return {"codes": np.packbits(bits.reshape(-1)), "scales": scales}

    def decode(self, tensors: Mapping[str, np.ndarray], key: str = "") -> np.ndarray:
        _only(tensors, {"codes", "scales"})
        kept = self.kept(key)
        count = self.size if kept is None else len(kept)
        packed = _get(tensors, "codes", "uint8", (math.ceil(count * self.bits / 8),))
        scales = _finite(_get(tensors, "scales", self.scale_dtype, (math.ceil(count / self.block),)), "scales")
        if (scales < 0).any():
            raise SerializationError("compressed update has negative block scales")
        bits = np.unpackbits(packed)[: count * self.bits].reshape(count, self.bits)
        codes = np.packbits(np.pad(bits, ((0, 0), (8 - self.bits, 0))), axis=1)[:, 0]
        return self._spread(self.dequantize(codes, scales), kept)


def keep_mask(size: int, key: str, threshold: int) -> np.ndarray:
    """Coordinate i is kept when splitmix64(seed + i * golden) < threshold, seed taken from sha256(key):
    independent of the data, uniform, and computed identically by client and server."""
    seed = np.uint64(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        z = seed + np.arange(size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z < np.uint64(threshold)


def block_scales(values: np.ndarray, block: int, dtype: str = "float32", *, up: bool = False) -> np.ndarray:
    """Per-block max |x| in the scale's wire dtype, rounded down (the block's largest coordinate is clipped
    to it, a change below one rounding of the scale, and it lands exactly on an end of the grid, so the scale
    is read back from the dequantised vector) or, with `up`, rounded up (nothing is clipped; used for 1 bit,
    where every coordinate lands on an end of the grid anyway). float16 saturates at its largest value."""
    padded = np.zeros(math.ceil(len(values) / block) * block)
    padded[: len(values)] = np.abs(values)
    exact = padded.reshape(-1, block).max(axis=1)
    top = np.finfo(dtype).max
    with np.errstate(over="ignore"):
        scales = np.minimum(exact, top).astype(dtype)
    wrong = scales.astype(np.float64) < exact if up else scales.astype(np.float64) > exact
    wrong &= scales < top if up else scales > 0
    scales[wrong] = np.nextafter(scales[wrong], np.array(top if up else 0, dtype))
    return scales


class SparseCodec:
    """At most `k` non-zeros: strictly increasing uint32 indices and their values in `dtype`."""

    def __init__(self, size: int, k: int, dtype: str = "float32") -> None:
        if not 1 <= k <= size:
            raise ValueError(f"sparse codec needs 1 <= k <= size ({size}), got {k}")
        self.size, self.k, self.values = size, k, DenseCodec(k, dtype)
        self.name = f"sparse-{k}-{dtype}"

    def encode(self, vector: np.ndarray, key: str = "") -> dict[str, np.ndarray]:
        idx = np.flatnonzero(vector)
        if len(idx) > self.k:
            raise ValueError(f"vector has {len(idx)} non-zeros, the sparse codec carries at most {self.k}")
        return {"indices": idx.astype(np.uint32), "values": self.values.encode(vector[idx])["values"]}

    def decode(self, tensors: Mapping[str, np.ndarray], key: str = "") -> np.ndarray:
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
