"""Compression beyond one update: the seeded random mask of QSGD (pinned to an independent splitmix64, unbiased,
exact sizes), float16 scales, downlink changes that keep server and client replicas bit-identical (and a
hostile server's changes refused), the [compression] settings, extras in the model's dtype and the bytes on
the wire in the round metrics."""
import hashlib
import json
import math
import re
import struct
from collections import OrderedDict

import numpy as np
import pytest

from fedlearn import FedAvg, InProcessPool, Server, Update
from fedlearn.compression import QSGD, Cast, TopK, update_codec
from fedlearn.compression.codecs import QuantizedCodec
from fedlearn.compression.downlink import DownlinkClient, DownlinkServer
from fedlearn.compression.settings import CompressionSettings, compression_from_spec, spec_of
from fedlearn.config import ConfigError, SimulationConfig, load_toml
from fedlearn.params import Layout
from fedlearn.serialize import SerializationError, decode_update, encode_tensors, encode_update
from fedlearn.server import ClientSampler
from fedlearn.simulation.wire import WirePool

M64 = (1 << 64) - 1


def _splitmix_kept(size: int, key: str, fraction: float) -> list[int]:
    """Independent reference: the mask in plain Python integers."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    threshold = round(fraction * (1 << 64))
    kept = []
    for i in range(size):
        z = (seed + i * 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        if (z ^ (z >> 31)) < threshold:
            kept.append(i)
    return kept


def _payload_bytes(message: bytes) -> int:
    (head_len,) = struct.unpack_from("<I", message, 4)
    return json.loads(message[8:8 + head_len])["payload_bytes"]


def test_mask_is_the_splitmix_reference_and_sizes_are_the_hand_formula():
    d, bits, block = 3000, 3, 64
    q = QSGD(bits, block, scale_dtype="float16", fraction=0.3)
    delta = np.random.default_rng(0).normal(size=d)
    for cid, rnd in (("alice", 1), ("alice", 2), ("bob", 1)):
        kept = _splitmix_kept(d, f"{cid}/{rnd}", 0.3)
        sent = q.client(Update(cid, rnd, delta, 1), {"seed": 4}).delta
        assert np.flatnonzero(sent).tolist() == kept  # 3-bit levels are never 0, so the support is the mask
        message = encode_update(Update(cid, rnd, sent, 1), q.wire_codec(d))
        assert _payload_bytes(message) == math.ceil(len(kept) * bits / 8) + 2 * math.ceil(len(kept) / block)
        np.testing.assert_array_equal(decode_update(message, codec=q.wire_codec(d)).delta, sent)
    assert len(_splitmix_kept(d, "alice/1", 0.3)) != len(_splitmix_kept(d, "bob/1", 0.3))  # masks differ


@pytest.mark.parametrize("bits, fraction", [(1, 1.0), (2, 0.5)])
def test_masked_quantiser_is_unbiased_over_many_seeds(bits, fraction):
    rng = np.random.default_rng(1)
    x = rng.normal(size=24) * np.repeat([1.0, 1e-3, 30.0], 8)
    q = QSGD(bits, 8, scale_dtype="float16", fraction=fraction)
    draws = np.stack([q.client(Update(f"c{s % 97}", s, x, 1), {"seed": s}).delta for s in range(3000)])
    std = draws.std(axis=0)
    assert (np.abs(draws.mean(axis=0) - x) <= 5 * std / np.sqrt(len(draws)) + 1e-12).all()
    kept_share = (draws != 0).mean(axis=0)
    assert np.abs(kept_share - fraction).max() < 0.03


def test_one_bit_float16_scales_round_up_so_nothing_is_clipped():
    x = np.array([0.1, -0.30000001, 0.2, 1e-9, 7e4])  # 0.30000001 is not a float16; 7e4 is above float16's max
    codec = QuantizedCodec(len(x), 1, 3, scale_dtype="float16")
    scales = codec.encode(codec.quantize(x, np.random.default_rng(0)))["scales"]
    assert scales.dtype == np.float16
    assert scales[0] >= np.float16(0.30000001) and float(scales[0]) >= 0.30000001  # smallest float16 above it
    assert float(np.nextafter(scales[0], np.float16(0))) < 0.30000001
    assert scales[1] == np.finfo(np.float16).max  # saturates instead of becoming inf


QUANT = QuantizedCodec(200, 2, 16, scale_dtype="float16", fraction=0.5)


def _packed(tensors: dict, cid: str = "eve", rnd: int = 1) -> bytes:
    meta = {"kind": "update", "client_id": cid, "round": rnd, "num_examples": 1, "metrics": {}, "codec": QUANT.name}
    return encode_tensors({f"delta/{k}": v for k, v in tensors.items()}, meta)


def _honest_tensors(cid="eve", rnd=1) -> dict:
    count = len(_splitmix_kept(200, f"{cid}/{rnd}", 0.5))
    return {"codes": np.zeros(math.ceil(count * 2 / 8), np.uint8),
            "scales": np.ones(math.ceil(count / 16), np.float16)}


@pytest.mark.parametrize("change, reason", [
    (lambda t: {**t, "codes": t["codes"][:-1]}, "expected uint8"),
    (lambda t: {**t, "codes": np.zeros(len(t["codes"]) + 1, np.uint8)}, "expected uint8"),
    (lambda t: {**t, "scales": t["scales"].astype(np.float32)}, "expected float16"),
    (lambda t: {**t, "scales": np.full_like(t["scales"], np.inf)}, "non-finite scales"),
    (lambda t: {**t, "scales": np.full_like(t["scales"], np.nan)}, "non-finite scales"),
    (lambda t: {**t, "scales": -t["scales"]}, "negative block scales"),
    (lambda t: {**t, "indices": np.arange(3, dtype=np.uint32)}, "unexpected tensors"),
])
def test_masked_decoder_refuses_hostile_packing(change, reason):
    assert decode_update(_packed(_honest_tensors()), codec=QUANT).delta.shape == (200,)
    with pytest.raises(SerializationError, match=re.escape(reason)):
        decode_update(_packed(change(_honest_tensors())), codec=QUANT)


def test_a_packing_for_another_round_does_not_fit_this_rounds_mask():
    rnd = next(r for r in range(2, 50) if len(_honest_tensors("eve", r)["codes"]) != len(_honest_tensors()["codes"]))
    other = _honest_tensors("eve", rnd)
    with pytest.raises(SerializationError, match="expected uint8"):
        decode_update(_packed(other, "eve", 1), codec=QUANT)


# ---- downlink

def _state(values) -> OrderedDict:
    return OrderedDict(w=np.asarray(values[:60], np.float32).reshape(6, 10), b=np.asarray(values[60:], np.float32))


@pytest.mark.parametrize("compression, worst", [
    (QSGD(8, 16), 2 / 255),  # one grid step of the block
    (QSGD(2, 32, scale_dtype="float16", fraction=0.5), 3.0),  # a dropped coordinate, or one off by its scale / 0.5
    (TopK(0.2, error_feedback=False), 1.0),  # a coordinate not sent
    (Cast("bfloat16"), 2.0**-8),  # bfloat16 rounding
])
def test_downlink_replicas_stay_bit_identical_and_track_the_model(compression, worst):
    rng = np.random.default_rng(3)
    server = DownlinkServer(compression, keep=3)
    model = rng.normal(size=70)
    clients = {"a": DownlinkClient(), "b": DownlinkClient(), "c": DownlinkClient()}
    held: dict[str, int] = {}
    replica = None
    schedule = [["a", "b"], ["a"], ["a"], ["b", "a"], ["a"], ["a"], ["a"], ["a", "b", "c"], ["c"]]
    for cohort in schedule:
        model = model + rng.normal(size=70) * 0.1
        target = Layout.of(_state(model)).flatten(_state(model))
        sent = server.advance(_state(model))
        for cid in cohort:
            payload = server.payload(held.get(cid))
            got = clients[cid].receive(payload)
            held[cid] = server.version
            for name in sent:
                np.testing.assert_array_equal(got[name], sent[name])  # bit for bit what the server holds
                assert got[name].dtype == np.float32
            assert len(payload) <= len(encode_tensors(sent, {"kind": "state", "version": server.version}))
        if replica is not None:  # each change is taken against the replica: its error never accumulates
            gap = np.abs(target - replica).max()
            assert np.abs(target - Layout.of(sent).flatten(sent)).max() <= worst * gap + 1e-6
        replica = Layout.of(sent).flatten(sent)
    assert server.version == len(schedule) - 1
    server.advance(_state(model))  # the same model again: no new change
    assert server.version == len(schedule) - 1


def test_downlink_sends_missed_changes_or_the_whole_replica():
    server = DownlinkServer(QSGD(8, 64), keep=2)
    model = np.linspace(-1, 1, 2000)
    server.advance(_state(model))
    full = len(server.payload(None))
    for _ in range(3):
        model = model + 0.01
        server.advance(_state(model))
    one = server.payload(server.version - 1)
    two = server.payload(server.version - 2)
    assert len(one) < len(two) < full  # one change, two changes, the whole model
    assert server.payload(server.version - 3) == server.payload(None)  # evicted: the whole replica


def test_a_hostile_or_confused_server_cannot_silently_desync_a_client():
    server = DownlinkServer(QSGD(8, 16))
    model = np.linspace(-1, 1, 70)
    server.advance(_state(model))
    client = DownlinkClient()
    with pytest.raises(SerializationError, match="before any model"):
        DownlinkClient().receive(_change(server, model + 0.1))
    client.receive(server.payload(None))
    good = _change(server, model + 0.2)
    bad_start = _rewrite(good, lambda m, t: ({**m, "from": 5}, t))
    too_many = _rewrite(good, lambda m, t: ({**m, "to": m["from"] + 100}, t))
    extra = _rewrite(good, lambda m, t: (m, {**t, "9/codes": np.zeros(3, np.uint8)}))
    bad_spec = _rewrite(good, lambda m, t: ({**m, "compression": {"method": "qsgd", "bits": 99}}, t))
    name = f"{server.version}/codes"
    short = _rewrite(good, lambda m, t: (m, {**t, name: t[name][:-1]}))
    for message, reason in ((bad_start, f"holds version {server.version - 1}"), (too_many, "at most 64 changes"),
                            (extra, "unexpected tensor '9/codes'"), (bad_spec, "bits"), (short, "expected uint8")):
        with pytest.raises(SerializationError, match=re.escape(reason)):
            client.receive(message)
        assert client.version == server.version - 1  # nothing half-applied
    client.receive(good)
    assert client.version == server.version


def _change(server: DownlinkServer, model) -> bytes:
    held = server.version
    server.advance(_state(model))
    return server.payload(held)


def _rewrite(message: bytes, edit) -> bytes:
    from fedlearn.serialize import decode_tensors

    tensors, meta = decode_tensors(message)
    meta, tensors = edit(meta, dict(tensors))
    return encode_tensors(tensors, meta)


# ---- settings

def test_compression_settings_from_toml_and_their_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[compression.uplink]\nmethod = "qsgd"\nbits = 3\nfraction = 0.3\nscale_dtype = "float16"\n'
                    '[compression.downlink]\nmethod = "qsgd"\nbits = 8\n')
    cfg = SimulationConfig.from_dict(load_toml(path))
    settings = CompressionSettings.from_dict(cfg.compression)
    assert isinstance(settings.uplink, QSGD) and (settings.uplink.bits, settings.uplink.fraction) == (3, 0.3)
    assert settings.downlink.bits == 8 and settings.measured
    assert compression_from_spec(spec_of(settings.uplink)).wire_codec(100).name == settings.uplink.wire_codec(100).name
    for table, reason in (({"uplink": {"method": "qsgd", "bits": 0}}, "1 <= bits <= 8"),
                          ({"uplink": {"method": "qsgd", "bits": True}}, "bits must be int"),
                          ({"uplink": {"method": "qsgd", "fraction": 1.5}}, "(0, 1]"),
                          ({"uplink": {"method": "topk", "fraction": "a lot"}}, "fraction must be int or float"),
                          ({"uplink": {"method": "qsgd", "bitz": 2}}, "no setting 'bitz' (did you mean 'bits'?)"),
                          ({"uplink": {"method": "zip"}}, "method must be one of"),
                          ({"downlink": {"method": "topk"}}, "error_feedback = false"),
                          ({"both": {}}, "unknown [compression] setting")):
        with pytest.raises(ConfigError, match=re.escape(reason)):
            SimulationConfig(compression=table)


def test_compression_flags_reach_the_settings():
    from fedlearn.cli import _simulation_settings, build_parser

    args = build_parser().parse_args(["simulate", "--compress", "qsgd:bits=2,fraction=0.5,scale_dtype=float16",
                                      "--downlink-compress", "bf16"])
    cfg = SimulationConfig.from_dict(_simulation_settings(args))
    assert cfg.compression == {"uplink": {"method": "qsgd", "bits": 2, "fraction": 0.5, "scale_dtype": "float16"},
                               "downlink": {"method": "bf16"}}


# ---- extras and bytes on the wire

class _Extras(InProcessPool):
    """Clients whose updates carry a float64 control variate as SCAFFOLD's do."""

    def __init__(self, size):
        super().__init__(lambda cid: None, ["a", "b"])
        self.size = size

    def fit(self, state, instructions, transforms=()):
        return [Update(cid, 1, np.full(self.size, 0.1), 3, {}, extras={"c": np.full(self.size, 1 / 3)})
                for cid in instructions]


def test_extras_travel_in_the_model_dtype_and_bytes_reach_the_round_metrics():
    d = 500
    state = OrderedDict(w=np.zeros(d, np.float32))
    pool = WirePool(_Extras(d))
    [update, _] = pool.fit(state, {"a": {}, "b": {}})
    assert update.extras["c"].dtype == np.float64 and update.extras["c"][0] == np.float32(1 / 3)
    one = pool.last.bytes_up // 2
    assert 8 * d <= one < 8 * d + 1024  # float32 delta + float32 extra + header; float64 extras would be 12 * d
    server = Server(WirePool(_Extras(d)), FedAvg(), state, sampler=ClientSampler(count=2), anomaly_checks=None)
    record = server.run(1).rounds[0]
    assert record.metrics["bytes_up"] == 2 * one
    assert 2 * 4 * d <= record.metrics["bytes_down"] < 2 * (4 * d + 1024)


# ---- downlink over gRPC

def test_remote_pool_sends_compressed_changes_and_counts_the_bytes(tmp_path):
    """Over a real gRPC stream: a connection that holds the previous model gets only the compressed change, a
    new connection the whole replica; both reconstruct exactly the model the server holds for them, and the
    round's bytes are the messages' sizes."""
    from concurrent.futures import ThreadPoolExecutor

    from fedlearn.transport import certs
    from fedlearn.transport import fedlearn_pb2 as pb
    from fedlearn.transport.certs import ClientBundle
    from fedlearn.transport.channels import open_channel, start_server
    from fedlearn.transport.client_process import Connection
    from fedlearn.transport.remote_pool import RemotePool
    from fedlearn.transport.service import Service

    certs.create(tmp_path, ["alice", "bob"])
    pool = RemotePool("run-D", round_deadline=5, wait_timeout=5, downlink=QSGD(8, 64))
    service = Service(pool, tmp_path / "allowlist.txt", lambda: pb.StatusReply(run_id="run-D"))
    grpc_server, port = start_server([service.handler()], "127.0.0.1:0", None, service.admission.capacity)
    executor = ThreadPoolExecutor(1)
    try:
        def connect(cid):
            return Connection(open_channel(f"127.0.0.1:{port}", None), cid,
                              ClientBundle.load(tmp_path / "clients" / cid).identity)

        def round_(rnd, model, conns):
            state = _state(model)
            future = executor.submit(pool.fit, state, {c.client_id: {"round": rnd} for c in conns})
            tasks = {c.client_id: c.next_task() for c in conns}
            for c in conns:
                task = tasks[c.client_id]
                payload = encode_update(Update(c.client_id, rnd, np.zeros(2000), 1), pool_codec)
                c.send_result(c.result_header(task.header, payload), payload)
                assert c.read_ack().accepted
            future.result(10)
            return tasks

        pool_codec = update_codec((), Layout.of(_state(np.zeros(2000))))  # updates: the model's dtype
        alice = connect("alice")
        model = np.linspace(-1, 1, 2000)
        first = round_(1, model, [alice])["alice"]
        np.testing.assert_array_equal(first.state["b"], _state(model)["b"])  # the first model is the model
        pool.transport_metrics()
        model = model + 0.001 * np.sin(np.arange(2000))
        bob = connect("bob")
        tasks = round_(2, model, [alice, bob])
        replica = pool.downlink.layout.unflatten(pool.downlink.replica)
        for task in tasks.values():
            for name in replica:
                np.testing.assert_array_equal(task.state[name], replica[name])
        assert tasks["alice"].wire_bytes < tasks["bob"].wire_bytes / 3  # 8-bit change vs the float32 replica
        metrics = pool.transport_metrics()
        assert metrics["bytes_down"] == pool.last_stats["fit"].bytes_down > tasks["bob"].wire_bytes
        assert metrics["bytes_up"] == pool.last_stats["fit"].bytes_up > 2 * 4 * 2000
        assert np.abs(Layout.of(replica).flatten(replica) - model).max() < 1e-3  # close to the server's model
    finally:
        pool.finish("done")
        grpc_server.stop(0)
        executor.shutdown(wait=False)
