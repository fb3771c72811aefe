"""Client half of federated statistics: what one client computes from its own feature rows.

The server asks with a `SummaryRequest` carried in a task's config under ``STATISTICS_KEY``; `run_fit` (the
wrapper every pool calls, also inside protocol stages such as secure aggregation's masked stage) answers such
a task with `statistics_update` instead of training. The plain stage ``analytics/summary`` is one more
protocol message whose built-in handler (`answer_summary`) runs that task and returns the vector.

Vectors, for d features and B bins per feature (histogram counts row-major, feature by feature):

- ``moments``:   [n, mean (d), M2 (d), min (d), max (d)] (+ histogram (d*B) when B > 0); M2 = sum (x - mean)^2
- ``histogram``: [n, histogram (d*B)]
- ``sums``:      [n, sum z (d), sum z^2 (d)] (+ histogram (d*B)), where z = (clip(x, low, high) - centre) / half
                 lies in [-1, 1]; sums survive secure aggregation and take DP noise of a known sensitivity.

Every vector is multiplied by the request's `scale` before it leaves (secure aggregation's clip range over the
largest row count). Values outside [low, high] count in the first or last bin.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..client import Client
from ..messages import ClientSession, Message
from ..types import Config, State, Update

STATISTICS_KEY = "statistics"  # task config key holding a SummaryRequest (its `to_config()`)
SUMMARY = "analytics/summary"  # message kind of the plain exchange
KINDS = ("moments", "histogram", "sums")
MAX_BINS = 4096
MAX_FEATURES = 1 << 20


@dataclass(frozen=True)
class SummaryRequest:
    """What the server asks every client to summarise. `low` / `high`: per-feature histogram range (bins
    `bins`, 0 for none) and, for ``sums``, the declared bounds every value is clipped to. `max_rows`: the most
    rows a client may have (None: no limit); `scale` multiplies the answer."""

    kind: str
    features: int
    bins: int = 0
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    scale: float = 1.0
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"statistics request kind must be one of {KINDS}, got {self.kind!r}")
        if not 1 <= self.features <= MAX_FEATURES:
            raise ValueError(f"statistics need 1 to {MAX_FEATURES} features, got {self.features}")
        if not 0 <= self.bins <= MAX_BINS or (self.kind == "histogram" and self.bins == 0):
            raise ValueError(f"histogram bins must be in [1, {MAX_BINS}], got {self.bins}")
        ranged = self.bins > 0 or self.kind == "sums"
        if ranged and not (len(self.low) == len(self.high) == self.features):
            raise ValueError(f"a histogram or sums request needs low and high for each of the {self.features} features")
        if ranged and not all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi for lo, hi in zip(self.low, self.high)):
            raise ValueError("each feature's range needs finite low <= high")
        if self.kind == "sums" and not all(lo < hi for lo, hi in zip(self.low, self.high)):
            raise ValueError("declared feature bounds need low < high for every feature")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"the request's scale must be a positive finite number, got {self.scale}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")

    @property
    def size(self) -> int:
        """Length of the answer vector."""
        d = self.features
        head = {"moments": 1 + 4 * d, "histogram": 1, "sums": 1 + 2 * d}[self.kind]
        return head + d * self.bins

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": self.features, "bins": self.bins, "low": list(self.low),
                "high": list(self.high), "scale": self.scale, "max_rows": self.max_rows}

    @classmethod
    def from_config(cls, raw: Any) -> "SummaryRequest":
        """Parse a request from a task config; `ValueError` for anything malformed (the server is untrusted)."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"the statistics request must be a mapping, got {type(raw).__name__}")
        try:
            kind, features, bins, scale = raw["kind"], raw["features"], raw["bins"], raw["scale"]
            low, high, max_rows = raw["low"], raw["high"], raw["max_rows"]
        except KeyError as exc:
            raise ValueError(f"the statistics request lacks {exc}") from None
        ints = (features, bins) + (() if max_rows is None else (max_rows,))
        if not isinstance(kind, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError("the statistics request's kind must be a string and features, bins, max_rows integers")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ValueError("the statistics request's scale must be a number")
        if not (isinstance(low, list) and isinstance(high, list) and len(low) <= MAX_FEATURES >= len(high)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in low + high)):
            raise ValueError("the statistics request's low and high must be lists of numbers")
        return cls(kind, features, bins, tuple(map(float, low)), tuple(map(float, high)), float(scale), max_rows)


def summarise(x: np.ndarray, request: SummaryRequest) -> np.ndarray:
    """The answer vector of `request` for feature rows `x` (rows, features), before scaling."""
    n, d = x.shape
    parts: list[np.ndarray] = [np.array([float(n)])]
    low, high = np.array(request.low), np.array(request.high)
    if request.kind == "moments":
        mean = x.mean(axis=0) if n else np.zeros(d)
        m2 = ((x - mean) ** 2).sum(axis=0)
        parts += [mean, m2, x.min(axis=0) if n else np.zeros(d), x.max(axis=0) if n else np.zeros(d)]
    elif request.kind == "sums":
        centre, half = (high + low) / 2, (high - low) / 2
        z = (np.clip(x, low, high) - centre) / half
        parts += [z.sum(axis=0), (z * z).sum(axis=0)]
    if request.bins:
        parts.append(histogram(x, low, high, request.bins).ravel())
    return np.concatenate(parts)


def histogram(x: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """Counts (features, bins) of equal-width bins over [low, high] per feature; values outside count in the
    first or last bin, and a feature with low == high puts everything in its first bin."""
    n, d = x.shape
    width = np.where(high > low, high - low, 1.0)
    index = np.clip(np.floor((x - low) / width * bins), 0, bins - 1).astype(np.int64)
    flat = (index + np.arange(d) * bins).ravel()
    return np.bincount(flat, minlength=d * bins).reshape(d, bins).astype(np.float64)


def statistics_update(client: Client, config: Config) -> Update:
    """`client`'s answer to a statistics task: its summary vector as the update's delta (row count as its
    example count). A client whose rows are malformed, or more than the request allows, raises `ValueError`
    and so fails this task with the reason, as a crashed training task would."""
    request = SummaryRequest.from_config(config[STATISTICS_KEY])
    x = np.asarray(client.local_features(), dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != request.features:
        raise ValueError(f"client {client.cid!r}: local_features() gave shape {x.shape}; the request is for "
                         f"(rows, {request.features})")
    if not np.isfinite(x).all():
        raise ValueError(f"client {client.cid!r}: its features hold NaN or infinite values")
    if request.max_rows is not None and len(x) > request.max_rows:
        raise ValueError(f"client {client.cid!r} has {len(x)} rows, more than the {request.max_rows} the request "
                         "allows (the secure sum's range)")
    rnd = config.get("round", 0)
    return Update(client.cid, rnd if isinstance(rnd, int) else 0, summarise(x, request) * request.scale, len(x))


def answer_summary(session: ClientSession, message: Message) -> Message:
    """Handler of the plain ``analytics/summary`` stage: run the statistics task the message carries (through
    the pool's task runner, so fault injection and the client's own code run as for training)."""
    config = message.meta.get("config")
    if not isinstance(config, dict) or STATISTICS_KEY not in config:
        raise ValueError(f"{SUMMARY} carries no statistics request")
    update = session.fit(dict(config))
    return Message(SUMMARY, {"summary": np.asarray(update.delta, dtype=np.float64)}, {"round": message.meta.get("round")})


def summary_state(request: SummaryRequest) -> State:
    """The placeholder 'model' a statistics exchange carries: one zero vector of the answer's size, so the
    secure-aggregation protocol (which masks vectors of the model's size) sums the answers unchanged."""
    from collections import OrderedDict

    return OrderedDict(statistics=np.zeros(request.size))


class FeatureRows(Client):
    """A client holding only feature rows: it answers statistics tasks and trains nothing (for statistics of a
    `FederatedDataset` without a model)."""

    def __init__(self, cid: str, x: np.ndarray) -> None:
        super().__init__(cid)
        self.x = np.asarray(x)

    def local_features(self) -> np.ndarray:
        return self.x.reshape(len(self.x), -1)

    def fit(self, state: State, config: Config) -> Update:
        raise NotImplementedError(f"client {self.cid!r} holds only feature rows for statistics; it cannot train")
