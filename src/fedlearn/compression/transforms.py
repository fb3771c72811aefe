"""Compression as transforms: the client half makes the lossy choice (which grid point, which coordinates),
the wire codec (`codecs.py`) packs the result exactly, the server half checks what arrived.

The client half returns the update the server will decode, bit for bit, as a dense float64 delta, so the
round loop, the strategies and the in-process simulation see exactly what a deployment's server sees.
A compression transform comes last among the client halves (after clipping and noise: compressing a noised
update is post-processing), one per run; `check_chain` refuses the combinations whose math does not hold.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..serialize import SerializationError, decode_tensors, encode_tensors, update_key
from ..transforms.base import Transform
from ..types import Config, Failure, Update
from .codecs import DENSE_DTYPES, DenseCodec, QuantizedCodec, SparseCodec, round_to

SECAGG_REASON = (
    "secure aggregation adds pairwise masks in a finite field and the server learns only the sum; the masks "
    "cancel only if every client sends a dense vector on the same fixed grid, which secure aggregation makes "
    "itself (its quantisation bits are the compression knob there). Per-client block scales (qsgd) and "
    "per-client sparsity patterns (top-k, random-k) do not compose with it; a float16/bfloat16 cast does")
CENTRAL_DP_REASON = (
    "central DP adds noise on the server calibrated to the clip norm, so what a client sends must stay within "
    "it; {name} can make the update longer than it was after clipping ({why}). Use top-k without error "
    "feedback or random-k without rescaling, or local DP (compressing a noised update is post-processing)")


def _rng(config: Config, client_id: str, salt: int) -> np.random.Generator:
    """A client's randomness for one task: from the task's seed, so a run (and its resume) is reproducible."""
    return np.random.default_rng([int(config.get("seed", 0)), zlib.crc32(client_id.encode()), salt])


class Compression(Transform):
    """Base of the compression transforms. `norm_preserving`: the sent update is never longer than the one
    given (what central DP's sensitivity needs); `why_not` says how it can grow when it is not."""

    norm_preserving = False
    why_not = ""
    per_update = True

    def wire_codec(self, size: int) -> Any:
        """The codec that carries this transform's output for a model of `size` parameters."""
        raise NotImplementedError

    def check_chain(self, chain: Sequence[Transform], protocol: Any) -> None:
        others = [t.name for t in chain if isinstance(t, Compression) and t is not self]
        if others:
            raise ValueError(f"one compression transform per run: {self.name} and {', '.join(others)}")
        after = [t.name for t in chain[list(chain).index(self) + 1:] if type(t).client is not Transform.client]
        if after:
            raise ValueError(f"{self.name} must be the last transform that changes updates on the client "
                             f"(compress after clipping and noise), but {', '.join(after)} run after it")
        if getattr(protocol, "name", "plain") != "plain" and not isinstance(self, Cast):
            raise ValueError(f"{self.name} with {protocol.name}: {SECAGG_REASON}")
        if any(t.name == "central_dp" for t in chain) and not self.norm_preserving:
            raise ValueError(CENTRAL_DP_REASON.format(name=self.name, why=self.why_not))


class Cast(Compression):
    """The delta rounded to float16 or bfloat16 (half the bytes of float32)."""

    why_not = "rounding to the nearest representable value can round up"
    stateful_client = False

    def __init__(self, dtype: str = "bfloat16") -> None:
        if dtype not in DENSE_DTYPES:
            raise ValueError(f"cast dtype must be one of {DENSE_DTYPES}, got {dtype!r}")
        self.dtype, self.name = dtype, f"cast_{dtype}"

    def client(self, update: Update, config: Config) -> Update:
        return dataclasses.replace(update, delta=round_to(update.delta, self.dtype))

    def wire_codec(self, size: int) -> DenseCodec:
        return DenseCodec(size, self.dtype)


class QSGD(Compression):
    """Unbiased stochastic `bits`-bit quantisation (Alistarh et al. 2017, QSGD) with one scale per block of
    `block` coordinates (`scale_dtype` float32, or float16 for less overhead): each coordinate rounds at random
    to one of its block's 2**bits evenly spaced levels in [-max|x|, max|x|], with probabilities that make the
    expectation exact. With `fraction` < 1, each coordinate travels with that probability and is rescaled by
    its inverse (unbiased random-k); the mask is derived from the client id and round, which the server knows,
    so no indices travel (1 bit at `fraction` 0.8 costs about 0.8 bits a coordinate)."""

    why_not = "a coordinate can round up to its block's maximum"

    def __init__(self, bits: int = 4, block: int = 256, *, scale_dtype: str = "float32", fraction: float = 1.0) -> None:
        QuantizedCodec(1, bits, block, scale_dtype=scale_dtype, fraction=fraction)  # validates
        self.bits, self.block, self.scale_dtype, self.fraction = bits, block, scale_dtype, fraction
        self.name = "qsgd"

    def client(self, update: Update, config: Config) -> Update:
        codec = self.wire_codec(len(update.delta))
        sent = codec.quantize(update.delta, _rng(config, update.client_id, 31), update_key(update.client_id, update.round))
        return dataclasses.replace(update, delta=sent)

    def wire_codec(self, size: int) -> QuantizedCodec:
        return QuantizedCodec(size, self.bits, self.block, scale_dtype=self.scale_dtype, fraction=self.fraction)


class _Sparse(Compression):
    """k of d coordinates (`fraction` of them, at least one) travel as index and float32 value."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"the fraction of coordinates sent must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def k(self, size: int) -> int:
        return max(1, math.ceil(self.fraction * size))

    def wire_codec(self, size: int) -> SparseCodec:
        return SparseCodec(size, self.k(size))

    def server(self, updates: list[Update], rnd: int) -> tuple[list[Update], list[Failure]]:
        """Refuse updates with more non-zeros than the codec carries (a client that skipped compression)."""
        kept, refused = [], []
        for u in updates:
            nnz, k = int(np.count_nonzero(u.delta)), self.k(len(u.delta))
            if nnz > k:
                refused.append(Failure(u.client_id, "rejected", f"{self.name}: {nnz} non-zeros, at most {k} allowed"))
            else:
                kept.append(u)
        return kept, refused


class TopK(_Sparse):
    """The k largest-magnitude coordinates, with error feedback (Stich et al. 2018): what was not sent is
    kept per client as a residual and added to the next update, so nothing is lost, only delayed. The
    residual is client state: in memory, or with `state_dir` one file per client on the client's own disk
    (written after each update, read back when the client restarts)."""

    why_not = "error feedback adds the residual of earlier rounds"

    def __init__(self, fraction: float = 0.01, *, error_feedback: bool = True, state_dir: str | Path | None = None) -> None:
        super().__init__(fraction)
        self.error_feedback = error_feedback
        self.norm_preserving = not error_feedback
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.residuals: dict[str, np.ndarray] = {}
        self.name = "topk"

    def client(self, update: Update, config: Config) -> Update:
        size = len(update.delta)
        residual = self.residual(update.client_id, size) if self.error_feedback else 0.0
        full = update.delta + residual
        keep = np.argpartition(np.abs(full), size - self.k(size))[size - self.k(size):]
        sent = np.zeros(size)
        sent[keep] = round_to(full[keep], "float32")
        if self.error_feedback:
            self._save(update.client_id, full - sent)
        return dataclasses.replace(update, delta=sent)

    def residual(self, client_id: str, size: int) -> np.ndarray:
        """The client's residual (zeros before its first update)."""
        if client_id not in self.residuals and self.state_dir is not None and self._path(client_id).exists():
            self.residuals[client_id] = self._load(client_id, size)
        return self.residuals.get(client_id, np.zeros(size))

    def _path(self, client_id: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"topk-residual-{hashlib.sha256(client_id.encode()).hexdigest()[:24]}.flt"

    def _load(self, client_id: str, size: int) -> np.ndarray:
        path = self._path(client_id)
        try:
            tensors, meta = decode_tensors(path.read_bytes())
        except SerializationError as exc:
            raise ValueError(f"top-k residual file {path} is unreadable ({exc}); delete it to start afresh") from None
        residual = tensors.get("residual")
        if meta.get("client_id") != client_id or residual is None or residual.shape != (size,):
            raise ValueError(f"top-k residual file {path} is not client {client_id!r}'s residual for a model of "
                             f"{size} parameters; delete it to start afresh")
        return residual.astype(np.float64)

    def _save(self, client_id: str, residual: np.ndarray) -> None:
        self.residuals[client_id] = residual
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._path(client_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode_tensors({"residual": residual}, {"kind": "topk_residual", "client_id": client_id}))
        os.replace(tmp, path)  # atomic: a crash leaves the old residual or the new one, never half a file


class RandomK(_Sparse):
    """k coordinates chosen at random (seeded by the task), scaled by d/k so the update stays unbiased
    (`rescale=False` sends them as they are: biased, but never longer than the update)."""

    why_not = "the d/k rescaling lengthens the kept coordinates"

    def __init__(self, fraction: float = 0.01, *, rescale: bool = True) -> None:
        super().__init__(fraction)
        self.rescale = rescale
        self.norm_preserving = not rescale
        self.name = "randomk"

    def client(self, update: Update, config: Config) -> Update:
        size = len(update.delta)
        k = self.k(size)
        keep = _rng(config, update.client_id, 37).choice(size, size=k, replace=False)
        sent = np.zeros(size)
        sent[keep] = round_to(update.delta[keep] * (size / k if self.rescale else 1.0), "float32")
        return dataclasses.replace(update, delta=sent)
