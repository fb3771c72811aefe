"""Server half of federated statistics: ask the clients of any `ClientPool` for summaries, check each one, and
combine them, in one or two exchanges.

Follow one request. Without declared bounds (plain): exchange 1 asks every client for its count, mean, M2,
min and max (``moments``); the federated min and max fix the histogram range; exchange 2 asks for
equal-width bin counts over it (``histogram``). With declared bounds one exchange carries both. Each reply is
checked where it arrives (`summary_problem`): shape, finiteness, whole counts >= 0, a mean inside [min, max],
M2 no larger than the range allows, histograms that count the client's rows; a bad one drops that client, with
the reason, from the whole result. Accepted summaries are combined by `chan_merge` (float64).

Under secure aggregation (`secure`, a `SecAggProtocol` whose client handlers the pool has) or DP (`dp`), the
clients send ``sums`` over declared bounds instead (count, sums of z-scores and their squares, histogram):
min and max are not sums, so they are not computed (the declared bounds stand in for them). Secure
aggregation runs its unchanged protocol on these vectors, scaled into its clip range by `max_rows` (the most
rows any client may have); DP noise (`StatisticsDP`) is added to the sum before anything is derived from it.

Everything travels as protocol stages through `ClientPool.exchange`, so the same code runs over every
simulation pool and over a deployment's `RemotePool` (client processes answer the plain stage by default).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..app import App
from ..data import FederatedDataset
from ..messages import Message
from ..secagg.protocol import SecAggConfig
from ..secagg.server import SecAggProtocol
from ..server.pool import ClientPool
from ..server.protocol import exchange_stage
from ..server.validate import MAX_COUNT
from ..strategies import FedAvg
from ..types import Failure, Update
from .privacy import StatisticsDP
from .stats import FederatedStatistics, chan_merge, moments_from_sums
from .summary import STATISTICS_KEY, SUMMARY, FeatureRows, SummaryRequest, summary_state

DEFAULT_BINS = 64


def federated_statistics(
    pool: ClientPool,
    *,
    features: int | None = None,
    bounds: Sequence[tuple[float, float]] | np.ndarray | None = None,
    bins: int = DEFAULT_BINS,
    clients: Sequence[str] | None = None,
    secure: SecAggProtocol | None = None,
    dp: StatisticsDP | None = None,
    max_rows: int | None = None,
    rnd: int = 0,
    deadline: float = 600.0,
    seed: int | None = None,
) -> FederatedStatistics:
    """Per-feature count, mean, variance, min/max and a histogram (for quantiles) of the feature rows of
    `clients` (default: all of the pool's), computed from their summaries.

    Give `features` (the number of features) or `bounds` (declared (low, high) per feature: the histogram range,
    and where values are clipped under `secure` / `dp`, which need them). `bins` per feature (0: no histogram,
    no quantiles). `max_rows` caps any client's row count (needed by `secure`). `rnd` tags the exchanges (a
    secure-aggregation round number, so pick one no training round uses), `deadline` bounds each client's
    answer, `seed` seeds the DP noise (default: fresh randomness)."""
    ids = [str(c) for c in (clients if clients is not None else pool.client_ids)]
    if not ids:
        raise ValueError("federated statistics need at least one client")
    low, high = _bounds(bounds)
    if low is not None:
        if features is not None and features != len(low):
            raise ValueError(f"features={features} but bounds give {len(low)} features")
        features = len(low)
    if features is None:
        raise ValueError("say how many features the clients hold: features=N, or bounds=[(low, high), ...]")
    if (secure is not None or dp is not None) and low is None:
        raise ValueError("secure aggregation and DP need declared bounds=[(low, high), ...] for every feature: they "
                         "sum clipped values (min and max are not sums, and DP noise needs a known range)")
    if secure is not None:
        if max_rows is None:
            raise ValueError("secure aggregation of statistics needs max_rows, the most rows any client may have "
                             "(it scales the summaries into the protocol's clip range)")
        if secure.noise > 0:
            raise ValueError("the secure-aggregation protocol adds distributed DP noise for model updates; give "
                             "statistics a protocol with noise=0 and use dp=StatisticsDP(...)")
    if low is None or (secure is None and dp is None):
        return _plain(pool, ids, features, low, high, bins, max_rows, rnd, deadline)
    return _sums(pool, ids, SummaryRequest("sums", features, bins, tuple(low), tuple(high),
                                           secure.config.clip_range / max_rows if secure else 1.0, max_rows),
                 secure, dp, rnd, deadline, seed)


def simulate_statistics(
    source: App | FederatedDataset,
    *,
    secure: bool | SecAggConfig = False,
    backend: str = "sequential",
    seed: int = 0,
    **options,
) -> FederatedStatistics:
    """`federated_statistics` over the simulated clients of an app (each answers from `local_features()`;
    a `TorchClient` gives its training inputs) or of a `FederatedDataset`'s client inputs, in a pool of
    `backend`. `secure` (True or a `SecAggConfig`) runs secure aggregation with fresh client identities;
    `seed` seeds its graph and the DP noise; `options` are `federated_statistics`'s."""
    if isinstance(source, FederatedDataset):
        client_fn, ids = (lambda cid: FeatureRows(cid, source.clients[cid][0])), source.client_ids
    else:
        client_fn, ids = source.client, source.simulated_client_ids
    protocol, handlers = None, {}
    if secure:
        from ..secagg.client import SecAggClient
        from ..secagg.keys import Identities

        identities = Identities.generate(ids)
        handlers = SecAggClient(identities.sign, identities.registry).handlers()
        config = secure if isinstance(secure, SecAggConfig) else SecAggConfig()
        protocol = SecAggProtocol(config, identities.registry, seed=seed)
    from ..simulation.backends import make_pool  # the simulation package imports this one's client half

    pool = make_pool(backend, client_fn, ids, handlers=handlers)
    try:
        return federated_statistics(pool, secure=protocol, seed=seed, **options)
    finally:
        pool.close()


def _bounds(bounds: Sequence[tuple[float, float]] | np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if bounds is None:
        return None, None
    array = np.asarray(bounds, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise ValueError(f"bounds must be one (low, high) pair per feature, got shape {array.shape}")
    if not (np.isfinite(array).all() and (array[:, 0] < array[:, 1]).all()):
        bad = int(np.argmax(~(np.isfinite(array).all(axis=1) & (array[:, 0] < array[:, 1]))))
        raise ValueError(f"feature {bad}'s bounds {tuple(array[bad])} must be finite with low < high")
    return array[:, 0].copy(), array[:, 1].copy()


def _ask(pool: ClientPool, ids: Sequence[str], request: SummaryRequest, rnd: int, deadline: float,
         dropped: dict[str, str]) -> dict[str, np.ndarray]:
    """One plain exchange: each client's answer vector, or its failure's reason in `dropped`."""
    config = {"round": rnd, STATISTICS_KEY: request.to_config()}
    requests = {cid: Message(SUMMARY, meta={"round": rnd, "config": config}) for cid in ids}
    failures: list[Failure] = []
    # no model travels: the stage trains nothing, so the pool's check of the clients' transforms does not apply
    answers = exchange_stage(pool, SUMMARY, requests, failures, deadline=deadline)
    dropped.update({f.client_id: f"{f.kind}: {f.reason}" for f in failures})
    return {cid: reply.tensors.get("summary") for cid, reply in answers.items()}


def summary_problem(vector: np.ndarray | None, request: SummaryRequest, rows: float | None = None) -> str | None:
    """Why one client's answer to `request` is unusable, or None. `rows`: the count its earlier answer gave."""
    if not isinstance(vector, np.ndarray):
        return "sent no summary"
    if vector.dtype.kind != "f" or vector.shape != (request.size,):
        return f"summary is {vector.dtype} of shape {vector.shape}, expected float of shape ({request.size},)"
    if not np.isfinite(vector).all():
        return "summary holds NaN or infinite values"
    v = vector / request.scale
    n, d = float(v[0]), request.features
    if not (0 <= n <= MAX_COUNT and n == np.floor(n)):
        return f"row count {n!r} is not a whole number >= 0"
    if request.max_rows is not None and n > request.max_rows:
        return f"row count {n:g} is above the {request.max_rows} allowed"
    if rows is not None and n != rows:
        return f"its histogram counts {n:g} rows but its first answer said {rows:g}"
    if request.kind == "moments" and n > 0:
        mean, m2, lo, hi = (v[1 + i * d: 1 + (i + 1) * d] for i in range(4))
        slack = 1e-9 * (np.abs(lo) + np.abs(hi) + 1.0)
        if (lo > hi).any():
            return "a minimum is above its maximum"
        if ((mean < lo - slack) | (mean > hi + slack)).any():
            return "a mean lies outside its own [min, max]"
        if ((m2 < 0) | (m2 > n * ((hi - lo) / 2 + slack) ** 2 * (1 + 1e-9))).any():
            return "a sum of squared deviations is negative or larger than the range [min, max] allows"
    if request.kind == "sums":
        s1, s2 = v[1: 1 + d], v[1 + d: 1 + 2 * d]
        slack = 1e-9 * (n + 1)
        if ((np.abs(s1) > n + slack) | (s2 < -slack) | (s2 > n + slack) | (s1 * s1 > n * s2 + slack)).any():
            return "sums of z-scores are impossible for values inside the declared bounds"
    if request.bins:
        counts = v[-d * request.bins:].reshape(d, request.bins)
        if ((counts < 0) | (counts != np.floor(counts))).any():
            return "histogram counts are not whole numbers >= 0"
        if (counts.sum(axis=1) != n).any():
            return "a feature's histogram does not count the client's rows"
    return None


def _checked(answers: dict[str, np.ndarray], request: SummaryRequest, dropped: dict[str, str],
             rows: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    good = {}
    for cid, vector in answers.items():
        problem = summary_problem(vector, request, None if rows is None else rows[cid])
        if problem is None:
            good[cid] = vector / request.scale
        else:
            dropped[cid] = f"rejected: {problem}"
    return good


def _plain(pool: ClientPool, ids: list[str], d: int, low: np.ndarray | None, high: np.ndarray | None, bins: int,
           max_rows: int | None, rnd: int, deadline: float) -> FederatedStatistics:
    dropped: dict[str, str] = {}
    ranged = low is not None and bins > 0
    first = SummaryRequest("moments", d, bins if ranged else 0, tuple(low) if ranged else (),
                           tuple(high) if ranged else (), max_rows=max_rows)
    moments = _checked(_ask(pool, ids, first, rnd, deadline, dropped), first, dropped)
    filled = [v for v in moments.values() if v[0] > 0]
    if not filled:
        raise ValueError(f"no client gave a usable summary with any rows; dropped: {dropped or 'none'}")
    minimum = np.min([v[1 + 2 * d: 1 + 3 * d] for v in filled], axis=0)
    maximum = np.max([v[1 + 3 * d: 1 + 4 * d] for v in filled], axis=0)
    exchanges, histogram = 1, None
    if low is None:
        low, high = minimum, maximum
    if ranged:
        histogram = np.sum([v[1 + 4 * d:] for v in moments.values()], axis=0).reshape(d, bins)
    elif bins > 0:
        second = SummaryRequest("histogram", d, bins, tuple(low), tuple(high), max_rows=max_rows)
        answers = _ask(pool, list(moments), second, rnd, deadline, dropped)
        counts = _checked(answers, second, dropped, {cid: moments[cid][0] for cid in answers})
        moments = {cid: v for cid, v in moments.items() if cid in counts}
        histogram = np.sum([v[1:] for v in counts.values()], axis=0).reshape(d, bins) if counts else None
        exchanges = 2
        filled = [v for v in moments.values() if v[0] > 0]
        if not filled:
            raise ValueError(f"no client answered both exchanges usably; dropped: {dropped}")
        minimum = np.min([v[1 + 2 * d: 1 + 3 * d] for v in filled], axis=0)
        maximum = np.max([v[1 + 3 * d: 1 + 4 * d] for v in filled], axis=0)
    n, mean, m2 = chan_merge([(v[0], v[1: 1 + d], v[1 + d: 1 + 2 * d]) for v in moments.values()], d)
    return FederatedStatistics(n, mean, _sample_var(n, m2), np.asarray(low), np.asarray(high), histogram,
                               sorted(moments), dropped, minimum, maximum, exchanges)


def _sums(pool: ClientPool, ids: list[str], request: SummaryRequest, secure: SecAggProtocol | None,
          dp: StatisticsDP | None, rnd: int, deadline: float, seed: int | None) -> FederatedStatistics:
    dropped: dict[str, str] = {}
    d, bins = request.features, request.bins
    if secure is None:
        good = _checked(_ask(pool, ids, request, rnd, deadline, dropped), request, dropped)
        if not good:
            raise ValueError(f"no client gave a usable summary; dropped: {dropped or 'none'}")
        total, contributors = np.sum(list(good.values()), axis=0), sorted(good)
    else:
        config = {"round": rnd, STATISTICS_KEY: request.to_config()}
        results = secure.collect(pool, summary_state(request), {cid: dict(config) for cid in ids}, ())
        updates = [r for r in results if isinstance(r, Update)]
        dropped.update({r.client_id: f"{r.kind}: {r.reason}" for r in results if isinstance(r, Failure)})
        secure.aggregate(pool, FedAvg(), updates, rnd)  # raises SecAggAbort (with the reason) when it cannot finish
        assert secure.last_sum is not None
        total, contributors = secure.last_sum / request.scale, sorted(u.client_id for u in updates)
        if dp is None:  # quantisation leaves the count and the bin counts a hair off whole numbers
            total[0], total[1 + 2 * d:] = np.round(total[0]), np.round(total[1 + 2 * d:])
    epsilon = delta = noise_std = None
    if dp is not None:
        total = dp.add_noise(total, d, bins > 0, np.random.default_rng(seed))
        epsilon, delta = dp.spent()
        noise_std = dp.noise_std(d, bins > 0)
    low, high = np.array(request.low), np.array(request.high)
    n, mean, m2 = moments_from_sums(float(total[0]), total[1: 1 + d], total[1 + d: 1 + 2 * d], low, high)
    histogram = np.maximum(total[1 + 2 * d:], 0.0).reshape(d, bins) if bins else None
    return FederatedStatistics(n, mean, _sample_var(n, m2), low, high, histogram, contributors, dropped,
                               secure=secure is not None, epsilon=epsilon, delta=delta, noise_std=noise_std)


def _sample_var(n: float, m2: np.ndarray) -> np.ndarray:
    """Sample variance (ddof=1); NaN with fewer than two rows."""
    return m2 / (n - 1) if n > 1 else np.full_like(m2, np.nan)
