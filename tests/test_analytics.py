"""Federated statistics against independent computations: numpy on the pooled rows for count, mean, variance,
min and max; numpy's quantiles for the histogram estimates (within the stated one-bin bound); the DP noise
against the hand formula and the epsilon against dp-accounting; secure aggregation against the plain result;
hostile summaries and clients dropped with their reason; the standardiser against numpy and the heart-disease
loader's pooled standardisation."""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fedlearn import (FederatedStatistics, InProcessPool, StatisticsDP, Standardizer, TorchClient, Transform,
                      Update, federated_statistics, simulate_statistics)
from fedlearn.analytics import FeatureRows, SummaryRequest
from fedlearn.analytics.summary import summary_state
from fedlearn.data import FederatedDataset
from fedlearn.messages import Message
from fedlearn.secagg.quantize import max_levels

HEART = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "heart_disease"
D = 3
BOUNDS = [(1e6 - 30.0, 1e6 + 30.0), (-10.0, 10.0), (0.0, 50.0)]


def _rows(seed: int = 0) -> dict[str, np.ndarray]:
    """Four clients of different sizes and locations; feature 0 sits at 1e6 with a spread of a few units, where
    summing squares naively in float64 loses most digits of the variance."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate((40, 75, 120, 9)):
        out[f"c{i}"] = np.column_stack([rng.normal(1e6 + 2 * i, 1 + i, n), rng.uniform(-5, 5 + i, n),
                                        rng.exponential(3 + i, n).clip(0, 49)])
    return out


def _pool(rows: dict[str, np.ndarray], cls=InProcessPool, **kwargs) -> InProcessPool:
    return cls(lambda cid: FeatureRows(cid, rows[cid]), list(rows), **kwargs)


def _pooled(rows: dict[str, np.ndarray], without: tuple[str, ...] = ()) -> np.ndarray:
    return np.concatenate([x for cid, x in rows.items() if cid not in without])


def _assert_moments(stats: FederatedStatistics, pooled: np.ndarray, rtol: float = 1e-12) -> None:
    assert stats.count == len(pooled)
    np.testing.assert_allclose(stats.mean, pooled.mean(axis=0), rtol=rtol)
    np.testing.assert_allclose(stats.var, pooled.var(axis=0, ddof=1), rtol=max(rtol, 1e-9))
    np.testing.assert_allclose(stats.std, pooled.std(axis=0, ddof=1), rtol=max(rtol, 1e-9))


def _assert_quantiles(stats: FederatedStatistics, pooled: np.ndarray) -> None:
    for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0):
        estimate = stats.quantile(q)
        lower = np.quantile(pooled, q, axis=0, method="lower")
        higher = np.quantile(pooled, q, axis=0, method="higher")
        assert (estimate >= lower - stats.quantile_error).all() and (estimate <= higher + stats.quantile_error).all(), q


class Counting(InProcessPool):
    """Counts the exchanges the server makes."""

    exchanges = 0

    def exchange(self, messages, **kwargs):
        Counting.exchanges += 1
        return super().exchange(messages, **kwargs)


def test_plain_statistics_match_numpy_on_the_pooled_rows_in_two_exchanges():
    rows = _rows()
    Counting.exchanges = 0
    stats = federated_statistics(_pool(rows, Counting), features=D, bins=50)
    pooled = _pooled(rows)
    assert Counting.exchanges == stats.exchanges == 2 and stats.clients == sorted(rows) and not stats.dropped
    _assert_moments(stats, pooled)
    np.testing.assert_array_equal(stats.minimum, pooled.min(axis=0))
    np.testing.assert_array_equal(stats.maximum, pooled.max(axis=0))
    # bins span the federated [min, max] agreed in the first exchange
    np.testing.assert_allclose(stats.quantile_error, (pooled.max(axis=0) - pooled.min(axis=0)) / 50)
    _assert_quantiles(stats, pooled)
    np.testing.assert_array_equal(stats.histogram.sum(axis=1), [len(pooled)] * D)


def test_declared_bounds_need_one_exchange_and_give_the_same_statistics():
    rows = _rows(1)
    Counting.exchanges = 0
    stats = federated_statistics(_pool(rows, Counting), bounds=BOUNDS, bins=40)
    assert Counting.exchanges == stats.exchanges == 1
    pooled = _pooled(rows)
    _assert_moments(stats, pooled)
    np.testing.assert_array_equal(stats.minimum, pooled.min(axis=0))
    _assert_quantiles(stats, pooled)
    np.testing.assert_allclose(stats.quantile_error, [60 / 40, 20 / 40, 50 / 40])


def test_an_app_of_torch_clients_and_the_vectorized_and_process_pools_give_the_same_statistics():
    rows = _rows(2)
    data = FederatedDataset("rows", {c: (x.astype(np.float32), np.zeros(len(x), dtype=np.int64)) for c, x in rows.items()},
                            (np.zeros((1, D), np.float32), np.zeros(1, np.int64)), 2)
    pool = InProcessPool(lambda cid: TorchClient(cid, lambda: None, *data.clients[cid]), data.client_ids)
    stats = federated_statistics(pool, features=D, bins=8)
    _assert_moments(stats, _pooled({c: x.astype(np.float32).astype(np.float64) for c, x in rows.items()}), 1e-12)
    for backend in ("vectorized", "process"):  # process workers answer the stages in their own processes
        other = simulate_statistics(data, backend=backend, features=D, bins=8)
        np.testing.assert_array_equal(other.mean, stats.mean)
        np.testing.assert_array_equal(other.histogram, stats.histogram)


def test_secure_aggregation_gives_the_plain_result():
    rows = _rows(3)
    plain = federated_statistics(_pool(rows), bounds=BOUNDS, bins=16)
    secure = simulate_statistics(FederatedDataset("rows", {c: (x, np.zeros(len(x))) for c, x in rows.items()},
                                                  (np.zeros((1, D)), np.zeros(1)), 2),
                                 secure=True, bounds=BOUNDS, bins=16, max_rows=500)
    assert secure.secure and secure.clients == sorted(rows) and secure.minimum is None and secure.maximum is None
    assert secure.count == plain.count
    np.testing.assert_array_equal(secure.histogram, plain.histogram)  # whole counts survive quantisation exactly
    # each client's sums are quantised with step 2 / (levels - 1) of the clip range 1 over max_rows rows: the sum of
    # 4 clients is off by at most 4 steps (x max_rows) in z units, i.e. x half-range / count in the mean
    levels = max_levels(2 * 4)
    z_error = 4 * 2 / (levels - 1) * 500
    half = np.array([hi - lo for lo, hi in BOUNDS]) / 2
    np.testing.assert_allclose(secure.mean, plain.mean, rtol=0, atol=float((half * z_error / plain.count).max()))
    np.testing.assert_allclose(secure.var, plain.var, rtol=1e-4)
    np.testing.assert_array_equal(secure.quantile(0.5), plain.quantile(0.5))


def test_dp_noise_matches_the_hand_formula_and_the_accountant():
    d = 13
    gaussian = StatisticsDP("gaussian", noise_multiplier=1.5, delta=1e-6)
    laplace = StatisticsDP("laplace", epsilon=0.5)
    # one row moves the count by 1 and each feature's sum z, sum z^2 and histogram by at most 1: 1 + 3d terms
    assert gaussian.noise_std(d, histogram=True) == pytest.approx(1.5 * math.sqrt(1 + 3 * d), rel=1e-12)
    assert laplace.noise_std(d, histogram=True) == pytest.approx(math.sqrt(2) * (1 + 3 * d) / 0.5, rel=1e-12)
    assert gaussian.noise_std(d, histogram=False) == pytest.approx(1.5 * math.sqrt(1 + 2 * d), rel=1e-12)
    for dp, std in ((gaussian, 1.5 * math.sqrt(40)), (laplace, math.sqrt(2) * 40 / 0.5)):
        draws = dp.add_noise(np.zeros((4000, 1 + 3 * d)), d, True, np.random.default_rng(0))
        assert draws.std() == pytest.approx(std, rel=0.02)
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.5))
    assert gaussian.spent() == (pytest.approx(accountant.get_epsilon(1e-6), rel=1e-9), 1e-6)
    assert laplace.spent() == (0.5, 0.0)
    with pytest.raises(ValueError, match="target epsilon"):
        StatisticsDP("laplace")


def test_dp_statistics_report_their_noise_and_stay_near_the_truth():
    rows = {f"c{i}": np.random.default_rng(i).uniform(0, 10, size=(2000, 2)) for i in range(3)}
    dp = StatisticsDP("gaussian", noise_multiplier=2.0)
    stats = federated_statistics(_pool(rows), bounds=[(0, 10), (0, 10)], bins=10, dp=dp, seed=0)
    pooled = _pooled(rows)
    sigma = 2.0 * math.sqrt(1 + 3 * 2)
    assert stats.noise_std == pytest.approx(sigma) and stats.epsilon == pytest.approx(dp.spent()[0])
    assert stats.minimum is None and abs(stats.count - 6000) < 5 * sigma
    # sum z has noise sigma, so the mean (centre + half * sum z / n) is off by about half * sigma / n
    np.testing.assert_allclose(stats.mean, pooled.mean(axis=0), atol=5 * 5 * sigma / 6000)
    assert np.abs(stats.histogram[0] - np.histogram(pooled[:, 0], bins=10, range=(0, 10))[0]).max() < 5 * sigma


class Tampering(InProcessPool):
    """Client c2's answers are rewritten on the way, as a hostile client would send them."""

    tamper = staticmethod(lambda v: v)

    def exchange(self, messages, **kwargs):
        replies = super().exchange(messages, **kwargs)
        reply = replies.get("c2")
        if isinstance(reply, Message):
            reply.tensors["summary"] = type(self).tamper(reply.tensors["summary"].copy())
        return replies


def _set(index, value):
    def tamper(v):
        v[index] = value
        return v

    return tamper


@pytest.mark.parametrize("tamper, reason", [
    (_set(0, -3.0), "not a whole number >= 0"),
    (_set(0, 2.5), "not a whole number >= 0"),
    (_set(1, np.nan), "NaN or infinite"),
    (lambda v: v[:-1], "expected float of shape"),
    (lambda v: v.astype(np.int64), "expected float of shape"),
    (_set(1, 5e6), "mean lies outside"),  # c2's mean of feature 0 far above its own max
    (_set(1 + D, 1e9), "larger than the range"),  # M2 of feature 0 inflated
    (_set(1 + 2 * D, 2e6), "minimum is above its maximum"),
    (_set(-1, 1e6), "histogram does not count"),
    (_set(-1, -1.0), "not whole numbers >= 0"),
])
def test_a_hostile_summary_drops_that_client_with_the_reason(tamper, reason):
    rows = _rows(4)
    Tampering.tamper = staticmethod(tamper)
    stats = federated_statistics(_pool(rows, Tampering), bounds=BOUNDS, bins=10)
    assert list(stats.dropped) == ["c2"] and reason in stats.dropped["c2"]
    pooled = _pooled(rows, without=("c2",))
    _assert_moments(stats, pooled)
    np.testing.assert_array_equal(stats.minimum, pooled.min(axis=0))
    assert stats.histogram.sum() == D * len(pooled)


def test_a_hostile_second_answer_drops_the_client_from_both_exchanges():
    rows = _rows(5)

    def second_only(v):  # the histogram answer claims other rows than the first answer did
        if v.size == 1 + D * 10:
            v[0] += 1
            v[1] += 1
        return v

    Tampering.tamper = staticmethod(second_only)
    stats = federated_statistics(_pool(rows, Tampering), features=D, bins=10)
    assert "first answer said" in stats.dropped["c2"] and stats.exchanges == 2
    _assert_moments(stats, _pooled(rows, without=("c2",)))


def test_bad_client_data_and_wrong_feature_counts_cost_only_that_client():
    rows = _rows(6)
    rows["nan"] = np.array([[1e6, np.nan, 1.0], [1e6, 0.0, 1.0]])
    rows["wide"] = np.ones((5, D + 1))
    stats = federated_statistics(_pool(rows), features=D, bins=4)
    assert "NaN or infinite" in stats.dropped["nan"] and "(rows, 3)" in stats.dropped["wide"]
    _assert_moments(stats, _pooled(rows, without=("nan", "wide")))


def test_secure_and_dp_statistics_need_declared_bounds_and_a_row_cap():
    rows = _rows()
    with pytest.raises(ValueError, match="declared bounds"):
        federated_statistics(_pool(rows), features=D, dp=StatisticsDP())
    with pytest.raises(ValueError, match="max_rows"):
        simulate_statistics(FederatedDataset("r", {c: (x, np.zeros(len(x))) for c, x in rows.items()},
                                             (np.zeros((1, D)), np.zeros(1)), 2), secure=True, bounds=BOUNDS)
    with pytest.raises(ValueError, match="low < high"):
        federated_statistics(_pool(rows), bounds=[(0, 1), (2, 2), (0, 1)])
    with pytest.raises(ValueError, match="features=N"):
        federated_statistics(_pool(rows))


def test_the_standardiser_gives_zero_mean_and_unit_std_on_every_clients_rows():
    rows = _rows(7)
    stats = federated_statistics(_pool(rows), features=D, bins=0)
    scaler = Standardizer.from_statistics(stats)
    pooled = scaler(_pooled(rows))
    np.testing.assert_allclose(pooled.mean(axis=0), 0, atol=1e-8)
    np.testing.assert_allclose(pooled.std(axis=0, ddof=1), 1, rtol=1e-9)
    constant = Standardizer(np.array([2.0]), np.array([0.0]))
    np.testing.assert_array_equal(constant(np.array([[2.0], [5.0]])), [[0.0], [3.0]])  # centred only
    with pytest.raises(ValueError, match="4 features per row"):
        scaler(np.ones((2, 4)))


@pytest.mark.skipif(not HEART.is_dir(), reason="UCI heart disease files not in ../shared/data")
def test_heart_disease_federated_standardisation_equals_the_pooled_one():
    from fedlearn.data import load_heart_disease

    raw = load_heart_disease(HEART, "none")
    pooled = load_heart_disease(HEART, "global")  # statistics of all hospitals' training rows together
    federated = simulate_statistics(raw, features=13, bins=0).standardizer().apply(raw)
    for cid in raw.client_ids:
        np.testing.assert_allclose(federated.clients[cid][0], pooled.clients[cid][0], atol=1e-5)
        np.testing.assert_allclose(federated.client_test[cid][0], pooled.client_test[cid][0], atol=1e-5)
    np.testing.assert_allclose(federated.test[0], pooled.test[0], atol=1e-5)


class Doubling(Transform):
    """A client-side transform (as central DP's clipping is) that must never touch a statistics summary."""

    name = "doubling"

    def client(self, update, config):
        return Update(update.client_id, update.round, update.delta * 2, update.num_examples)


@contextmanager
def served(tmp_path: Path, rows: dict[str, np.ndarray], client_args):
    """A TLS gRPC server's `RemotePool` with every client of `rows` connected through `run_client` (in threads,
    with `client_args(cid, bundle)`); everything is stopped on the way out, also on failure."""
    from fedlearn.transport import certs
    from fedlearn.transport import fedlearn_pb2 as pb
    from fedlearn.transport.certs import ClientBundle
    from fedlearn.transport.channels import ServerTLS, start_server
    from fedlearn.transport.client_process import run_client
    from fedlearn.transport.remote_pool import RemotePool
    from fedlearn.transport.service import Service

    certs.create(tmp_path, list(rows))
    pool = RemotePool("run-stats", round_deadline=20, min_available=len(rows), min_clients=len(rows), wait_timeout=30)
    service = Service(pool, tmp_path / "allowlist.txt", lambda: pb.StatusReply(run_id="run-stats"))
    grpc_server, port = start_server([service.handler()], "127.0.0.1:0",
                                     ServerTLS(tmp_path / "server.pem", tmp_path / "server.key"),
                                     service.admission.capacity)
    threads = []
    try:
        for cid in rows:
            bundle = ClientBundle.load(tmp_path / "clients" / cid)
            args = (FeatureRows(cid, rows[cid]), f"127.0.0.1:{port}")
            kwargs = {"identity": bundle.identity, "tls": bundle.tls, "retry_for": 10, **client_args(cid, bundle)}
            threads.append(threading.Thread(target=run_client, args=args, kwargs=kwargs, daemon=True))
            threads[-1].start()
        yield pool
    finally:
        pool.finish("statistics done")
        for thread in threads:
            thread.join(10)
        grpc_server.stop(0)


def test_statistics_over_the_deployment_transport(tmp_path):
    """Client processes' code (`run_client`, TLS, signed identities) answers the plain stage over gRPC when it
    allows statistics in the clear, untouched by its client-side transforms; a client whose rows are malformed,
    and one that allows statistics only under secure aggregation (the default), are dropped with their reasons,
    and the others' statistics match numpy."""
    rows = _rows(8)
    rows = {"alice": rows["c0"], "bob": rows["c1"], "carol": np.ones((4, D + 2)), "dave": rows["c2"]}
    args = {"alice": {"statistics": "plain", "transforms": [Doubling()]}, "bob": {"statistics": "plain"},
            "carol": {"statistics": "plain"}, "dave": {}}
    with served(tmp_path, rows, lambda cid, bundle: args[cid]) as pool:
        stats = federated_statistics(pool, features=D, bins=8, deadline=20)
        # the same request as a plain fit task: answered in the clear only by a client that allows it
        request = SummaryRequest("moments", D)
        config = {"round": 1, "statistics": request.to_config()}
        fitted = {r.client_id: r for r in pool.fit(summary_state(request), {"bob": config, "dave": config})}
    assert stats.clients == ["alice", "bob"] and "(rows, 3)" in stats.dropped["carol"]
    assert "only inside secure aggregation" in stats.dropped["dave"]  # the default: no summary in the clear
    assert "only inside secure aggregation" in fitted["dave"].reason
    np.testing.assert_allclose(fitted["bob"].delta[1: 1 + D], rows["bob"].mean(axis=0), rtol=1e-12)
    pooled = _pooled(rows, without=("carol", "dave"))
    _assert_moments(stats, pooled)
    _assert_quantiles(stats, pooled)


def test_secure_statistics_over_the_deployment_transport(tmp_path):
    """Clients with the default policy answer inside secure aggregation, signing with their own identity keys;
    the result is the plain one of the same rows."""
    from fedlearn.secagg.protocol import SecAggConfig
    from fedlearn.secagg.server import SecAggProtocol
    from fedlearn.transport.secagg_handlers import load_peer_keys, secagg_handlers

    rows = _rows(10)
    with served(tmp_path, rows, lambda cid, bundle: {"handlers": secagg_handlers(cid, bundle.identity)}) as pool:
        registry = load_peer_keys(tmp_path / "allowlist.txt")
        secure = federated_statistics(pool, bounds=BOUNDS, bins=16, max_rows=500,
                                      secure=SecAggProtocol(SecAggConfig(), registry))
    plain = federated_statistics(_pool(rows), bounds=BOUNDS, bins=16)
    assert secure.secure and secure.clients == sorted(rows) and not secure.dropped and secure.count == plain.count
    np.testing.assert_array_equal(secure.histogram, plain.histogram)
    np.testing.assert_allclose(secure.var, plain.var, rtol=1e-4)


def test_values_outside_declared_bounds_are_clipped_under_secure_aggregation():
    rows = _rows(9)
    narrow = [(1e6 - 3.0, 1e6 + 3.0), (-2.0, 2.0), (0.0, 10.0)]  # many rows lie outside
    data = FederatedDataset("rows", {c: (x, np.zeros(len(x))) for c, x in rows.items()}, (np.zeros((1, D)), np.zeros(1)), 2)
    secure = simulate_statistics(data, secure=True, bounds=narrow, bins=8, max_rows=500)
    low, high = np.array(narrow).T
    clipped = np.clip(_pooled(rows), low, high)
    assert not secure.dropped and secure.count == len(clipped)
    np.testing.assert_allclose(secure.mean, clipped.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(secure.var, clipped.var(axis=0, ddof=1), rtol=1e-5)
    for j in range(D):
        np.testing.assert_array_equal(secure.histogram[j], np.histogram(clipped[:, j], bins=8, range=narrow[j])[0])
