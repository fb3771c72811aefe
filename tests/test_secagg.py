"""Secure aggregation: primitives, the protocol over the in-process pool, dropouts, aborts, forged keys."""
from __future__ import annotations

import time

import numpy as np
import pytest

from fedlearn import InProcessPool, Update, simulate
from fedlearn.aggregators import make_aggregator
from fedlearn.messages import Message, decode_message, encode_message, from_bytes
from fedlearn.privacy import CentralDP, SampledGaussian
from fedlearn.secagg import Identities, Quantizer, SecAggAbort, SecAggClient, SecAggConfig, SecAggError, SecAggProtocol
from fedlearn.secagg import keys, prg, quantize, shamir
from fedlearn.secagg.graph import neighbours
from fedlearn.secagg.protocol import ADVERTISE, CONSISTENCY, MASKED, SHARE, UNMASK
from fedlearn.server import ClientSampler, Server
from fedlearn.server.protocol import RoundAborted
from fedlearn.strategies import make_strategy
from vector_clients import VectorClient, known_delta, zero_state

DIM = 2000


def secagg_server(n: int, config: SecAggConfig, *, dim: int = DIM, failing: dict | None = None, transforms=(),
                  noise: float = 0.0):
    """A server over n vector clients with secure aggregation; `failing` maps stage -> client ids whose
    handler for that stage raises (the client vanished there)."""
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)
    handlers = SecAggClient(identities.sign, identities.registry).handlers()
    for stage, gone in (failing or {}).items():
        handlers[stage] = _vanishing(handlers[stage], set(gone))
    protocol = SecAggProtocol(config, identities.registry, seed=1, noise=noise)
    pool = InProcessPool(lambda cid: VectorClient(cid, dim), ids, handlers=handlers)
    server = Server(pool, make_strategy("fedavg"), zero_state(dim), sampler=ClientSampler(fraction=1.0),
                    protocol=protocol, anomaly_checks=None, transforms=transforms)
    return server, protocol


def _vanishing(handler, gone: set[str]):
    def handle(session, message):
        if session.cid in gone:
            raise ConnectionError("client vanished")
        return handler(session, message)
    return handle


def plain_sum(ids, dim: int = DIM) -> np.ndarray:
    return sum(known_delta(c, dim) for c in ids)


# primitives

def test_shamir_any_threshold_subset_recovers_and_fewer_do_not():
    secret = b"\x00\x01" + bytes(range(30))  # leading zero bytes must survive
    shares = shamir.split(secret, list(range(1, 8)), threshold=4)
    rng = np.random.default_rng(0)
    for _ in range(10):
        xs = rng.choice(np.arange(1, 8), size=4, replace=False)
        assert shamir.combine({int(x): shares[int(x)] for x in xs}, 4) == secret
    with pytest.raises(shamir.ShamirError, match="need 4 shares"):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # three shares interpolated as if the threshold were 3 give a different polynomial: not the secret
    try:
        wrong = shamir.combine({x: shares[x] for x in (1, 2, 3)}, 3)
    except shamir.ShamirError:
        wrong = None
    assert wrong != secret


def test_prg_is_seeded_by_the_whole_key_and_uniform():
    seed = bytes(range(32))
    a = prg.expand(seed, 50_000)
    assert np.array_equal(a, prg.expand(seed, 50_000))
    assert not np.array_equal(a, prg.expand(seed[:31] + b"\xff", 50_000))  # last byte matters: no truncation
    counts = np.bincount(a >> 26, minlength=64)
    chi2 = ((counts - a.size / 64) ** 2 / (a.size / 64)).sum()
    assert chi2 < 110  # df 63: p ~ 0.0002
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(b"short", 10)


def test_prg_is_aes_256_in_counter_mode_from_a_zero_counter():
    """Pinned to AES-256 applied block by block (ECB) to the counter values 0 and 1, read as little-endian
    uint32: an independent construction of the same keystream. Zero length is an empty mask, negative refused."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(100, 132))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    counters = (0).to_bytes(16, "big") + (1).to_bytes(16, "big")
    expected = np.frombuffer(ecb.update(counters) + ecb.finalize(), dtype="<u4")
    np.testing.assert_array_equal(prg.expand(seed, 8), expected)
    np.testing.assert_array_equal(prg.expand(seed, 5), expected[:5])
    empty = prg.expand(seed, 0)
    assert empty.shape == (0,) and empty.dtype == np.uint32
    with pytest.raises(ValueError, match="mask length must be >= 0, got -1"):
        prg.expand(seed, -1)


def test_the_cohort_check_allows_sums_up_to_two_to_the_32_minus_one_and_no_more():
    """4 levels (0..3): 1431655765 clients sum to at most 3 * 1431655765 = 2^32 - 1, the largest ring element
    (hand arithmetic); one more client could wrap around. `max_levels` gives back 4 for that cohort. A sum of
    exactly 2^32 is already one too many: it reads as 0."""
    cohort = (2**32 - 1) // 3
    assert 3 * cohort == 2**32 - 1
    Quantizer(1.0, 4).check_cohort(cohort)
    with pytest.raises(ValueError, match="would overflow the 2\\^32 ring; use at most 3 levels"):
        Quantizer(1.0, 4).check_cohort(cohort + 1)
    assert quantize.max_levels(cohort) == 4 and quantize.max_levels(cohort + 1) == 3 and quantize.max_levels(1) == 2**32
    with pytest.raises(ValueError, match="would overflow"):  # 2^16 clients x top level 2^16 = 2^32, which wraps to 0
        Quantizer(1.0, 2**16 + 1).check_cohort(2**16)
    Quantizer(1.0, 2**16 + 1).check_cohort(2**16 - 1)


@pytest.mark.parametrize("settings, why", [
    ({"threshold": 1.0}, "threshold must be in"), ({"threshold": 0.49}, "threshold must be in"),
    ({"degree": 3}, "even number >= 2"), ({"degree": 0}, "even number >= 2"), ({"graph": "ring"}, "graph must be"),
    ({"deadline": 0}, "deadlines must be positive"), ({"train_deadline": -1.0}, "deadlines must be positive"),
    ({"fields": (("loss", 0.0, 1.0), ("loss", 0.0, 2.0))}, "distinct names"),
    ({"fields": (("loss", 1.0, 1.0),)}, "finite bounds low < high"),
    ({"fields": (("loss", 0.0, float("inf")),)}, "finite bounds low < high"),
    ({"fields": tuple((f"m{i}", 0.0, 1.0) for i in range(65))}, "at most 64"),
])
def test_secagg_config_refuses_unsafe_or_broken_settings(settings, why):
    with pytest.raises(ValueError, match=why):
        SecAggConfig(**settings)


def test_secagg_config_accepts_the_edges_of_its_ranges():
    for settings in ({"threshold": 0.5}, {"threshold": 0.99}, {"degree": 2}, {"deadline": 1e-3},
                     {"fields": tuple((f"m{i}", -1.0, 1.0) for i in range(64))}, {"fields": ()}):
        SecAggConfig(**settings)


def test_stochastic_quantisation_is_unbiased_and_guards_the_ring():
    q = Quantizer(1.0, 101)
    x = np.full(200_000, 0.123)
    decoded = q.decode_sum(q.encode(x, np.random.default_rng(0)), 1)
    assert abs(decoded.mean() - 0.123) < 1e-3
    assert np.abs(decoded - 0.123).max() <= q.step + 1e-12
    assert q.decode_sum(q.encode(np.array([5.0, -5.0]), np.random.default_rng(0)), 1).tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="overflow"):
        Quantizer(1.0, 2**31).check_cohort(3)


def test_sparse_graph_is_symmetric_and_regular():
    cohort = [str(i) for i in range(40)]
    graph = neighbours(cohort, 8, seed=[0, 1])
    assert all(len(v) == 8 for v in graph.values())
    assert all(c in graph[j] for c, ns in graph.items() for j in ns)


def test_messages_round_trip_through_the_checked_wire_format():
    message = Message(MASKED, {"masked": np.arange(5, dtype=np.uint32), "sig/3": from_bytes(b"abc")}, {"round": 2})
    back = decode_message(encode_message(message))
    assert back.kind == MASKED and back.meta == {"round": 2}
    assert np.array_equal(back.tensors["masked"], message.tensors["masked"])


# the protocol

@pytest.mark.parametrize("config", [SecAggConfig(graph="full"), SecAggConfig(graph="sparse", degree=6)])
def test_unmasked_sum_equals_plain_sum_within_quantisation_error(config):
    n = 16
    server, protocol = secagg_server(n, config)
    server.run(1)
    step = config.quantizer(n).step
    error = np.abs(protocol.last_sum - plain_sum([str(i) for i in range(n)]))
    assert error.max() <= n * step
    assert np.allclose(server.params, protocol.last_sum / n)


def test_masked_update_the_server_sees_is_uniform():
    n = 8
    server, protocol = secagg_server(n, SecAggConfig(graph="full"), dim=40_000)
    instructions = {str(i): {"round": 1, "seed": 0} for i in range(n)}
    seen = protocol.collect(server.pool, server.state, instructions, [])
    masked = seen[0].delta.astype(np.uint64)
    plain = SecAggConfig().quantizer(n).encode(known_delta(seen[0].client_id, 40_000), np.random.default_rng(0))

    def chi2(values: np.ndarray) -> float:
        counts = np.bincount((values >> 26).astype(np.int64), minlength=64)
        return float(((counts - values.size / 64) ** 2 / (values.size / 64)).sum())

    assert chi2(masked) < 110  # indistinguishable from uniform on Z_2^32 (df 63, p ~ 0.0002)
    assert chi2(plain.astype(np.uint64)) > 10_000  # the unmasked quantised update is far from uniform
    assert abs(np.corrcoef(masked.astype(float), plain.astype(float))[0, 1]) < 0.03


@pytest.mark.parametrize("stage", [MASKED, UNMASK])
def test_a_third_dropping_after_masking_still_recovers_the_survivors_sum(stage):
    n = 12
    gone = {"1", "5", "9", "10"}
    server, protocol = secagg_server(n, SecAggConfig(graph="full"), failing={stage: gone})
    server.run(1)
    # dropped while training: not in the sum; dropped at unmasking: their masked input is already in it
    included = [str(i) for i in range(n) if stage == UNMASK or str(i) not in gone]
    assert np.abs(protocol.last_sum - plain_sum(included)).max() <= n * SecAggConfig().quantizer(n).step


def test_sparse_graph_recovers_from_dropouts():
    n = 30
    server, protocol = secagg_server(n, SecAggConfig(graph="sparse", degree=12), failing={MASKED: {"3", "17", "22"}})
    server.run(1)
    included = [str(i) for i in range(n) if str(i) not in {"3", "17", "22"}]
    assert np.abs(protocol.last_sum - plain_sum(included)).max() <= n * SecAggConfig().quantizer(n).step


def test_fewer_than_threshold_survivors_abort_the_round_not_the_run():
    n = 12  # threshold 7 of 12
    server, _ = secagg_server(n, SecAggConfig(graph="full"), failing={MASKED: {str(i) for i in range(6)}})
    before = server.params.copy()
    [record] = server.run(1).rounds
    assert issubclass(SecAggAbort, RoundAborted)
    assert np.array_equal(server.params, before) and server.round == 1
    assert record.metrics["round_failed"] == 1.0 and record.participants == []
    assert "aborted by the secagg protocol" in record.note
    assert "only 6 clients completed secagg/masked, fewer than the 7 secure aggregation needs" in record.note


def test_a_stalled_client_cannot_hang_the_round():
    n = 8
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)
    handlers = SecAggClient(identities.sign, identities.registry).handlers()
    advertise = handlers[ADVERTISE]

    def stall(session, message):
        if session.cid == "4":
            time.sleep(30)
        return advertise(session, message)

    handlers[ADVERTISE] = stall
    pool = InProcessPool(lambda cid: VectorClient(cid, DIM), ids, handlers=handlers)
    protocol = SecAggProtocol(SecAggConfig(graph="full", deadline=0.3), identities.registry)
    server = Server(pool, make_strategy("fedavg"), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                    protocol=protocol, anomaly_checks=None)
    start = time.perf_counter()
    record = server.run_round(1)
    assert time.perf_counter() - start < 10
    assert any(f.client_id == "4" and f.kind == "timeout" for f in record.failures)
    assert np.abs(protocol.last_sum - plain_sum([c for c in ids if c != "4"])).max() <= n * SecAggConfig().quantizer(n).step


# an active server

def _advertised(n: int):
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)
    client = SecAggClient(identities.sign, identities.registry)
    pool = InProcessPool(lambda cid: VectorClient(cid, DIM), ids, handlers=client.handlers())
    plan = SecAggProtocol(SecAggConfig(graph="full"), identities.registry).plan(1, ids)
    replies = pool.exchange({c: Message(ADVERTISE, meta=plan.to_meta()) for c in ids})
    return ids, pool, replies


def test_clients_refuse_a_swapped_key_advertisement():
    ids, pool, replies = _advertised(4)
    tensors = {}
    for j in ids[1:]:
        tensors.update({f"c_pk/{j}": replies[j].tensors["c_pk"], f"s_pk/{j}": replies[j].tensors["s_pk"],
                        f"sig/{j}": replies[j].tensors["signature"]})
    tensors["s_pk/2"] = from_bytes(keys.public_bytes(keys.load_private(bytes(32))))  # the server's own key
    result = pool.exchange({"0": Message(SHARE, tensors, {"round": 1})})["0"]
    assert result.kind == "crash" and "signature of client '2' does not verify" in result.reason


def test_clients_refuse_unsafe_plans_and_out_of_order_stages():
    ids, pool, _ = _advertised(4)
    plan = SecAggProtocol(SecAggConfig(graph="full"), {}).plan(1, ids).to_meta()
    for unsafe, why in [({"threshold": 2}, "unsafe threshold"), ({"quorum": 2}, "unsafe consistency quorum"),
                        ({"cohort": ["1", "2", "3"]}, "leaves this client out"), ({"levels": 2**31}, "overflow")]:
        assert why in pool.exchange({"0": Message(ADVERTISE, meta={**plan, **unsafe})})["0"].reason
    skipped = pool.exchange({"1": Message(UNMASK, meta={"round": 1, "survivors": ids})})["1"]
    assert "before the survivor set was confirmed" in skipped.reason


def _shared(n: int):
    """`_advertised`, then every client shares with every other: each client's inbox for the masking stage."""
    ids, pool, adverts = _advertised(n)
    shared = pool.exchange({c: Message(SHARE, {f"{kind}/{j}": adverts[j].tensors[name] for j in ids if j != c
                                                for kind, name in (("c_pk", "c_pk"), ("s_pk", "s_pk"),
                                                                   ("sig", "signature"))}, {"round": 1})
                            for c in ids})
    inbox = {c: {f"from/{j}": shared[j].tensors[f"to/{c}"] for j in ids if j != c} for c in ids}
    return ids, pool, inbox


def _masked(pool, inbox, sharers, to):
    return pool.exchange({c: Message(MASKED, {k: v for k, v in inbox[c].items() if k[5:] in sharers},
                                     {"round": 1, "sharers": sharers, "config": {"round": 1, "seed": 0}})
                          for c in to}, state=zero_state(DIM))


def test_a_client_unmasks_once_per_round_and_refuses_a_replayed_unmask_request():
    """Driving four honest clients through every stage by hand: each answers the unmask request with the seed
    shares of the survivors, then forgets the round's secrets, so the same request sent again (a replay by the
    server or by anyone on the path) is refused instead of revealing the shares a second time."""
    ids, pool, inbox = _shared(4)
    _masked(pool, inbox, ids, ids)
    confirmed = pool.exchange({c: Message(CONSISTENCY, meta={"round": 1, "survivors": ids}) for c in ids})
    unmask = Message(UNMASK, {f"sig/{j}": confirmed[j].tensors["signature"] for j in ids}, {"round": 1, "survivors": ids})
    first = pool.exchange({"0": unmask})["0"]
    assert sorted(first.tensors) == [f"b/{j}" for j in ids]  # a seed share of every survivor, no mask-key share
    again = pool.exchange({"0": unmask})["0"]
    assert again.kind == "crash" and "without a matching key advertisement" in again.reason


def test_a_client_masks_with_exactly_threshold_minus_one_live_neighbours_and_not_with_fewer():
    """Five clients, threshold 3 of 5 share holders (a majority, by hand): with itself and two neighbours that
    shared keys, client 0's seed can still be recovered, so it masks; with one neighbour it refuses."""
    ids, pool, inbox = _shared(5)
    enough = _masked(pool, inbox, ["0", "1", "2"], ["0"])["0"]
    assert isinstance(enough, Message) and enough.tensors["masked"].size > DIM
    ids, pool, inbox = _shared(5)
    too_few = _masked(pool, inbox, ["0", "1"], ["0"])["0"]
    assert too_few.kind == "crash" and "only 1 neighbours shared keys; the threshold is 3" in too_few.reason


@pytest.mark.parametrize("clip", [0, 0.0, -1.0, float("nan"), float("inf"), "1.0", None])
def test_distributed_dp_needs_a_positive_finite_clip_norm_from_the_server(clip):
    from fedlearn.secagg.client import encode_masked_input

    plan = SecAggProtocol(SecAggConfig(graph="full"), {}, noise=1.0).plan(1, ["0", "1", "2", "3"])
    config = {} if clip is None else {"dp_clip": clip}
    with pytest.raises(SecAggError, match="no valid clip norm"):
        encode_masked_input(plan, np.zeros(3), {}, config, np.random.default_rng(0))
    assert encode_masked_input(plan, np.zeros(3), {}, {"dp_clip": 1e-9}, np.random.default_rng(0)).size > 3


def test_robust_aggregators_are_refused_with_the_reason():
    strategy = make_strategy("fedavg")
    strategy.aggregator = make_aggregator("median")
    pool = InProcessPool(lambda cid: VectorClient(cid, DIM), ["0", "1"])
    with pytest.raises(ValueError, match="only the sum.*need each update on its own.*client-side clipping"):
        Server(pool, strategy, zero_state(DIM), sampler=ClientSampler(fraction=1.0),
               protocol=SecAggProtocol(SecAggConfig(), {}))


def test_dp_noise_with_secure_aggregation_matches_the_formula():
    n, dim, clip, z = 10, 40_000, 1.0, 2.0
    config = SecAggConfig(graph="full", clip_range=clip)
    step = config.quantizer(n).step
    dp = CentralDP(clip, SampledGaussian(z, 100, n, "fixed"), 1e-5, verify_clipping=False, rounding_step=step,
                   rng=np.random.default_rng(3))
    server, protocol = secagg_server(n, config, dim=dim, transforms=[dp])
    server.run(1)
    clipped_sum = protocol.last_sum
    noise = server.params - clipped_sum / n
    expected = z * (clip + step * np.sqrt(dim)) / n
    assert abs(noise.std() / expected - 1) < 0.02
    assert abs(noise.mean()) < 4 * expected / np.sqrt(dim)


def test_simulate_with_secure_aggregation_learns_like_the_plain_run():
    base = {"dataset": "digits", "num_clients": 20, "partition": "iid", "clients_per_round": 10, "rounds": 5,
            "local_epochs": 3, "batch_size": 8, "eval_clients": 0, "seed": 0}
    plain = simulate(base)
    secure = simulate({**base, "privacy": {"secagg": True, "secagg_graph": "full"}})
    assert secure.accuracy > 0.85  # IID clients of equal size: the unweighted mean is FedAvg's weighted one
    assert abs(secure.accuracy - plain.accuracy) < 0.02


# no metadata in the clear; the influence checks

class LossClient(VectorClient):
    """Reports a loss and an example count of its own, so a leak or a wrong sum shows."""

    def fit(self, state, config):
        update = super().fit(state, config)
        return Update(self.cid, update.round, update.delta, 10 + int(self.cid), {"train_loss": 0.1 * int(self.cid)})


def test_the_server_sees_no_example_counts_or_metrics_only_their_sums(monkeypatch):
    n = 8
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)
    pool = InProcessPool(lambda cid: LossClient(cid, DIM), ids,
                         handlers=SecAggClient(identities.sign, identities.registry).handlers())
    protocol = SecAggProtocol(SecAggConfig(graph="full"), identities.registry)
    server = Server(pool, make_strategy("fedavg"), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                    protocol=protocol, anomaly_checks=None)
    seen = []
    original = InProcessPool.exchange

    def spy(self, messages, **kwargs):
        replies = original(self, messages, **kwargs)
        seen.extend(r for r in replies.values() if isinstance(r, Message))
        return replies

    monkeypatch.setattr(InProcessPool, "exchange", spy)
    [record] = server.run(1).rounds
    masked = [r for r in seen if r.kind == MASKED]
    assert len(masked) == n
    assert all(set(r.meta) == {"round", "partial"} and set(r.tensors) == {"masked"} for r in masked)
    assert not any("num_examples" in r.meta or "metrics" in r.meta for r in seen)
    losses = [0.1 * i for i in range(n)]
    assert protocol.last_metrics["train_loss"] == pytest.approx(sum(losses), abs=n * 1e4 * 2 / 2**29)
    assert record.metrics["train_loss"] == pytest.approx(np.mean(losses), abs=1e-3)


def _inflated(handler, cid: str, offset: np.ndarray):
    """Client `cid` adds `offset` to its masked input: it skipped clipping, or forged its encoding."""
    def handle(session, message):
        reply = handler(session, message)
        if session.cid == cid:
            reply.tensors["masked"] = reply.tensors["masked"] + offset
        return reply
    return handle


def _attacked_round(offset: np.ndarray, transforms=(), client=VectorClient):
    n = 10
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)
    handlers = SecAggClient(identities.sign, identities.registry).handlers()
    handlers[MASKED] = _inflated(handlers[MASKED], "3", offset)
    protocol = SecAggProtocol(SecAggConfig(graph="full"), identities.registry)
    server = Server(InProcessPool(lambda cid: client(cid, DIM), ids, handlers=handlers), make_strategy("fedavg"),
                    zero_state(DIM), sampler=ClientSampler(fraction=1.0), protocol=protocol, anomaly_checks=None,
                    transforms=transforms)
    [record] = server.run(1).rounds
    return server, record


def test_a_client_that_skips_clipping_is_caught_by_the_sum_norm_check():
    """The attack of issue 11: one of 10 clients moves the mean by 0.9 per coordinate (9x a clipped client)."""
    n, clip = 10, 1.0
    step = SecAggConfig().quantizer(n).step
    offset = np.zeros(DIM + len(SecAggConfig().fields), dtype=np.uint32)
    offset[:DIM] = round(0.9 * n / step)
    dp = CentralDP(clip, SampledGaussian(1.0, 100, n, "fixed"), 1e-5, verify_clipping=False, rounding_step=step)
    server, record = _attacked_round(offset, [dp])
    assert record.metrics["round_failed"] == 1.0 and np.array_equal(server.params, np.zeros(DIM))
    assert "more than 10 clients clipped to 1 can reach" in record.note
    # an honest round with the same settings passes the check
    server, record = _attacked_round(np.zeros_like(offset), [dp])
    assert "round_failed" not in record.metrics and np.linalg.norm(server.params) > 0


def test_an_input_outside_the_ring_range_is_refused_even_without_dp():
    offset = np.zeros(DIM + len(SecAggConfig().fields), dtype=np.uint32)
    offset[5] = 2**31  # no n in-range encodings reach this: the sum wraps
    server, record = _attacked_round(offset)
    assert record.metrics["round_failed"] == 1.0 and np.array_equal(server.params, np.zeros(DIM))
    assert "1 coordinates of the unmasked sum lie outside" in record.note


class CeilingClient(VectorClient):
    """Sends 5 in every coordinate: clipped to the range 1, so every coordinate encodes to the top level L - 1."""

    def fit(self, state, config):
        return Update(self.cid, int(config["round"]), np.full(self.dim, 5.0), 10)


@pytest.mark.parametrize("excess", [0, 1])
def test_the_ring_range_check_allows_exactly_n_times_the_top_level(excess):
    """10 clients all at the top level L - 1 sum to 10 (L - 1) in every coordinate: the most 10 in-range inputs
    can reach, accepted (the mean update is the clip range 1); one unit more in one coordinate is refused."""
    offset = np.zeros(DIM + len(SecAggConfig().fields), dtype=np.uint32)
    offset[7] = excess
    server, record = _attacked_round(offset, client=CeilingClient)
    if excess:
        assert record.metrics["round_failed"] == 1.0 and np.array_equal(server.params, np.zeros(DIM))
        assert "1 coordinates of the unmasked sum lie outside what 10 clients" in record.note
    else:
        assert "round_failed" not in record.metrics
        np.testing.assert_allclose(server.params, np.ones(DIM), atol=1e-9)


def test_a_forged_key_advertisement_costs_only_its_sender():
    """Client 2 signs its advertisement with garbage: the server rejects it with the reason, and the other five
    finish the round with the sum of their own updates."""
    n = 6
    server, protocol = secagg_server(n, SecAggConfig(graph="full"))
    handlers = server.pool.handlers
    honest = handlers[ADVERTISE]

    def forged(session, message):
        reply = honest(session, message)
        if session.cid == "2":
            reply.tensors["signature"] = np.zeros_like(reply.tensors["signature"])
        return reply

    handlers[ADVERTISE] = forged
    [record] = server.run(1).rounds
    [failure] = record.failures
    assert failure.client_id == "2" and failure.kind == "rejected" and "bad signature" in failure.reason
    others = [c for c in map(str, range(n)) if c != "2"]
    assert sorted(record.participants) == others
    assert np.abs(protocol.last_sum - plain_sum(others)).max() <= n * SecAggConfig().quantizer(n).step


# distributed DP

@pytest.mark.parametrize("dropped", [0, 4])
def test_distributed_dp_noise_of_the_sum_matches_the_closed_form(dropped):
    """10 clients, quorum 6: each adds std z * s / sqrt(6), s = C + rounding bound. With all 10 in the sum its
    noise std is z * s * sqrt(10 / 6); with the 4 the protocol tolerates dropped, exactly the target z * s."""
    n, dim, clip, z = 10, 40_000, 1.0, 2.0
    config = SecAggConfig(graph="full", clip_range=clip * (1 + 10 * z / np.sqrt(6)))
    step = config.quantizer(n).step
    dp = CentralDP(clip, SampledGaussian(z, 100, n, "fixed"), 1e-5, verify_clipping=False, rounding_step=step,
                   distributed=True)
    gone = {str(i) for i in range(dropped)}
    server, protocol = secagg_server(n, config, dim=dim, transforms=[dp], noise=z, failing={MASKED: gone})
    [record] = server.run(1).rounds
    survivors = [str(i) for i in range(n) if str(i) not in gone]
    assert record.participants == survivors and protocol.last_sum is not None
    clipped = sum(known_delta(c, dim) * min(1.0, clip / np.linalg.norm(known_delta(c, dim))) for c in survivors)
    noise = protocol.last_sum - clipped
    target = z * (clip + step * np.sqrt(dim))
    assert abs(noise.std() / (target * np.sqrt(len(survivors) / 6)) - 1) < 0.02
    assert abs(noise.mean()) < 4 * noise.std() / np.sqrt(dim)
    # the server added nothing, and accounts for the worst case (the target std, on the expected cohort)
    assert np.allclose(server.params, protocol.last_sum / n)
    assert record.metrics["dp_noise_std"] == pytest.approx(target / n)


def test_distributed_dp_is_built_from_the_privacy_config_and_needs_secagg():
    from fedlearn.privacy import PrivacyConfig, build_privacy
    with pytest.raises(ValueError, match="dp_distributed needs secagg and central DP"):
        PrivacyConfig(dp_clip=1.0, dp_noise=1.0, dp_distributed=True)
    cfg = PrivacyConfig(dp_clip=1.0, dp_noise=1.5, secagg=True, secagg_graph="full", dp_distributed=True)
    setup = build_privacy(cfg, client_ids=[str(i) for i in range(20)], cohort=10, rounds=3,
                          strategy=make_strategy("fedavg"))
    assert setup.protocol.noise == 1.5 and setup.transforms[0].distributed
    assert setup.protocol.config.clip_range == pytest.approx(1 + 10 * 1.5 / np.sqrt(6))  # quorum 6 of 10
