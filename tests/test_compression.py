"""Compressed updates: the quantiser is unbiased with the closed-form variance, top-k error feedback keeps
every bit of what was not sent, payload sizes are what the formats promise, a hostile client's packed
update is refused, and compression refuses the combinations whose math does not hold."""
import json
import math
import re
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedlearn import FedAvg, InProcessPool, LocalDP, Server, Update
from fedlearn.compression import QSGD, Cast, RandomK, TopK, update_codec
from fedlearn.compression.codecs import DenseCodec, QuantizedCodec, SparseCodec, round_to
from fedlearn.params import Layout
from fedlearn.privacy.central import CentralDPClient
from fedlearn.serialize import SerializationError, decode_update, encode_tensors, encode_update
from fedlearn.server import ClientSampler
from fedlearn.server.protocol import RoundProtocol


def _payload_bytes(message: bytes) -> int:
    """The payload size a serialized message's own header declares."""
    (head_len,) = struct.unpack_from("<I", message, 4)
    return json.loads(message[8:8 + head_len])["payload_bytes"]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantiser_is_unbiased_with_the_closed_form_variance(bits):
    rng = np.random.default_rng(0)
    x = rng.normal(size=48) * np.repeat([1.0, 0.01, 5.0], 16)  # three blocks of very different scale
    codec = QuantizedCodec(len(x), bits, block=16)
    draws = np.stack([codec.quantize(x, np.random.default_rng(s)) for s in range(4000)])
    # closed form: each coordinate rounds between the two grid points around it, spacing 2 * scale / (2^b - 1)
    scale = np.repeat(np.abs(x).reshape(3, 16).max(axis=1), 16)
    levels = 2**bits - 1
    position = (x / scale + 1) * levels / 2
    frac = position - np.floor(position)
    variance = (2 * scale / levels) ** 2 * frac * (1 - frac)
    mean_error = np.abs(draws.mean(axis=0) - x)
    assert (mean_error <= 5 * np.sqrt(variance / len(draws)) + 1e-7 * scale).all()
    assert draws.var(axis=0).sum() == pytest.approx(variance.sum(), rel=0.06)
    # every draw lies on its block's grid, and the wire carries it exactly
    for draw in draws[:20]:
        np.testing.assert_array_equal(codec.decode(codec.encode(draw)), draw)


def test_payload_sizes_are_what_the_formats_promise():
    d = 10_000
    delta = np.random.default_rng(1).normal(size=d)
    update = Update("c", 1, delta, 5)
    q = QSGD(bits=2, block=256)
    sent = q.client(update, {"seed": 3})
    assert _payload_bytes(encode_update(sent, q.wire_codec(d))) == math.ceil(d * 2 / 8) + 4 * math.ceil(d / 256)
    top = TopK(0.01)
    assert _payload_bytes(encode_update(top.client(update, {}), top.wire_codec(d))) == 100 * (4 + 4)
    assert _payload_bytes(encode_update(update, DenseCodec(d, "float32"))) == 4 * d
    assert _payload_bytes(encode_update(update, DenseCodec(d, "bfloat16"))) == 2 * d
    assert _payload_bytes(encode_update(update)) == 8 * d  # no codec: the float64 vector itself


def test_updates_travel_in_the_model_dtype_by_default():
    state = OrderedDict(w=np.zeros((100, 10), np.float32), b=np.zeros(10, np.float32))
    codec = update_codec([], Layout.of(state))
    delta = np.random.default_rng(2).normal(size=1010)
    back = decode_update(encode_update(Update("c", 1, delta, 3), codec), codec=codec)
    assert back.delta.dtype == np.float64
    np.testing.assert_array_equal(back.delta, delta.astype(np.float32))
    assert update_codec([], Layout.of(OrderedDict(w=np.zeros(3)))).dtype == "float64"


def test_bfloat16_cast_matches_torch():
    x = np.random.default_rng(3).normal(size=1000) * 10.0 ** np.random.default_rng(4).integers(-8, 8, 1000)
    reference = torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(round_to(x, "bfloat16"), reference)
    cast = Cast("bfloat16")
    sent = cast.client(Update("c", 1, x, 1), {})
    codec = cast.wire_codec(len(x))
    np.testing.assert_array_equal(decode_update(encode_update(sent, codec), codec=codec).delta, reference)


def test_topk_error_feedback_keeps_the_residual_exactly(tmp_path):
    rng = np.random.default_rng(5)
    d, k = 200, 10
    top = TopK(k / d, state_dir=tmp_path)
    deltas, residual = [], np.zeros(d)
    for t in range(6):
        delta = rng.normal(size=d)
        deltas.append(delta)
        sent = top.client(Update("alice", t + 1, delta, 1), {}).delta
        full = delta + residual
        chosen = np.argsort(-np.abs(full))[:k]  # independent: sort instead of argpartition
        expected = np.zeros(d)
        expected[chosen] = full[chosen].astype(np.float32)
        np.testing.assert_array_equal(sent, expected)
        residual = full - expected
        np.testing.assert_array_equal(top.residuals["alice"], residual)
    # nothing is lost: what was sent plus what is held back is everything the client produced
    total_sent = sum(deltas) - top.residuals["alice"]
    np.testing.assert_allclose(total_sent + top.residuals["alice"], sum(deltas), rtol=0, atol=1e-12)
    # a restarted client reads its residual back from its own disk and carries on identically
    restarted = TopK(k / d, state_dir=tmp_path)
    nxt = rng.normal(size=d)
    np.testing.assert_array_equal(restarted.client(Update("alice", 7, nxt, 1), {}).delta,
                                  top.client(Update("alice", 7, nxt, 1), {}).delta)
    (tmp_path / "junk").write_bytes(b"")
    for f in tmp_path.glob("topk-residual-*.flt"):
        f.write_bytes(encode_tensors({"residual": np.zeros(3)}, {"client_id": "alice"}))
    with pytest.raises(ValueError, match="delete it to start afresh"):
        TopK(k / d, state_dir=tmp_path).client(Update("alice", 8, nxt, 1), {})


def test_randomk_is_unbiased_and_seeded():
    x = np.random.default_rng(6).normal(size=20)
    rk = RandomK(0.25)
    draws = np.stack([rk.client(Update("c", 1, x, 1), {"seed": s}).delta for s in range(6000)])
    assert (np.count_nonzero(draws, axis=1) == 5).all()
    np.testing.assert_allclose(draws.mean(axis=0), x, atol=5 * np.sqrt(3 * np.abs(x).max() ** 2 / 6000))
    np.testing.assert_array_equal(rk.client(Update("c", 1, x, 1), {"seed": 9}).delta,
                                  rk.client(Update("c", 1, x, 1), {"seed": 9}).delta)


def _packed(codec_name: str, tensors: dict) -> bytes:
    meta = {"kind": "update", "client_id": "eve", "round": 1, "num_examples": 1, "metrics": {}, "codec": codec_name}
    return encode_tensors({f"delta/{k}": v for k, v in tensors.items()}, meta)


SPARSE = SparseCodec(100, 5)
QUANT = QuantizedCodec(100, 3, 32)


@pytest.mark.parametrize("codec, tensors, reason", [
    (SPARSE, {"indices": np.array([1, 2, 300], np.uint32), "values": np.ones(3, np.float32)}, "below 100"),
    (SPARSE, {"indices": np.array([4, 2], np.uint32), "values": np.ones(2, np.float32)}, "strictly increasing"),
    (SPARSE, {"indices": np.array([2, 2], np.uint32), "values": np.ones(2, np.float32)}, "strictly increasing"),
    (SPARSE, {"indices": np.arange(6, dtype=np.uint32), "values": np.ones(6, np.float32)}, "at most 5"),
    (SPARSE, {"indices": np.array([1, 2], np.int64), "values": np.ones(2, np.float32)}, "uint32 indices"),
    (SPARSE, {"indices": np.array([1, 2], np.uint32), "values": np.ones(3, np.float32)}, "expected float32 (2,)"),
    (SPARSE, {"indices": np.array([1], np.uint32), "values": np.array([np.nan], np.float32)}, "non-finite"),
    (SPARSE, {"indices": np.array([1], np.uint32), "values": np.ones(1, np.float32), "x": np.ones(1)}, "unexpected"),
    (QUANT, {"codes": np.zeros(37, np.uint8), "scales": np.ones(4, np.float32)}, "expected uint8 (38,)"),
    (QUANT, {"codes": np.zeros(38, np.uint8), "scales": np.ones(5, np.float32)}, "expected float32 (4,)"),
    (QUANT, {"codes": np.zeros(38, np.uint8), "scales": -np.ones(4, np.float32)}, "negative block scales"),
    (QUANT, {"codes": np.zeros(38, np.uint8), "scales": np.full(4, np.inf, np.float32)}, "non-finite scales"),
    (QUANT, {"codes": np.zeros(38, np.uint8)}, "lacks tensor 'scales'"),
])
def test_decoding_refuses_malformed_compressed_updates(codec, tensors, reason):
    with pytest.raises(SerializationError, match=re.escape(reason)):
        decode_update(_packed(codec.name, tensors), codec=codec)


def test_decoding_refuses_another_codec_and_oversized_messages():
    good = _packed(SPARSE.name, {"indices": np.array([3], np.uint32), "values": np.ones(1, np.float32)})
    assert decode_update(good, codec=SPARSE).delta[3] == 1.0
    with pytest.raises(SerializationError, match="this run expects 'qsgd-3b-32'"):
        decode_update(good, codec=QUANT)
    with pytest.raises(SerializationError, match="this run expects"):  # a plain float64 delta is not accepted
        decode_update(encode_update(Update("eve", 1, np.ones(100), 1)), codec=SPARSE)
    with pytest.raises(SerializationError, match="exceeds the limit"):
        decode_update(good, codec=SPARSE, max_bytes=len(good) - 1)


def test_sparse_server_half_refuses_dense_updates():
    top = TopK(0.05)
    kept, refused = top.server([Update("a", 1, np.ones(100), 1), Update("b", 1, np.eye(100)[3], 1)], 1)
    assert [u.client_id for u in kept] == ["b"]
    assert refused[0].kind == "rejected" and "100 non-zeros, at most 5 allowed" in refused[0].reason


class _SecAgg(RoundProtocol):
    name = "secagg"


def test_compression_composes_with_dp_where_the_math_holds():
    pool = InProcessPool(lambda cid: None, ["a"])
    state = OrderedDict(w=np.zeros(4))

    def server(transforms, protocol=None):
        return Server(pool, FedAvg(), state, sampler=ClientSampler(count=1), transforms=transforms, protocol=protocol)

    server([LocalDP(1.0, 1.0, 1e-5), QSGD(4)])  # compressing a noised update is post-processing
    server([CentralDPClient(), TopK(0.1, error_feedback=False)])  # never longer than the clipped update
    server([CentralDPClient(), RandomK(0.1, rescale=False)])
    with pytest.raises(ValueError, match="must be the last transform"):
        server([QSGD(4), LocalDP(1.0, 1.0, 1e-5)])
    with pytest.raises(ValueError, match="one compression transform per run"):
        server([QSGD(4), TopK(0.1)])
    for compression, why in ((QSGD(4), "round up"), (TopK(0.1), "error feedback"), (RandomK(0.1), "rescaling")):
        with pytest.raises(ValueError, match=f"central DP.*{why}"):
            server([CentralDPClient(), compression])
    with pytest.raises(ValueError, match="secure aggregation adds pairwise masks"):
        server([TopK(0.1)], _SecAgg())
    server([Cast("float16")], _SecAgg())
