"""Simulation engines: the vectorised cohort, worker processes and Ray give the sequential pool's results."""
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlearn import ConfigError, Failure, FedAvg, FedProx, Update, simulate
from fedlearn.data import federate, load_digits
from fedlearn.serialize import SerializationError, encode_tensors
from fedlearn.server import ClientSampler, Server
from fedlearn.simulation import FaultInjector, InProcessPool
from fedlearn.simulation.backends import make_pool
from fedlearn.simulation.workers import decode_instructions, decode_results, encode_instructions, encode_results
from fedlearn.torch import MLP, TorchClient, state_of
from fedlearn.secagg import Identities, SecAggClient, SecAggConfig, SecAggProtocol
from fedlearn.transforms import Transform
from vector_clients import known_delta, zero_state

DATA = federate(load_digits(), "dirichlet", 24, seed=1, alpha=0.5)  # unequal client sizes
SIZES = sorted(len(y) for _, y in DATA.clients.values())


def _mlp() -> torch.nn.Module:
    return MLP(64, 10, hidden=(16,))


def _client(cid: str, model_fn=_mlp, **kwargs) -> TorchClient:
    x, y = DATA.clients[cid]
    settings = {"batch_size": 8, "lr": 0.1, "local_epochs": 2, "momentum": 0.5, "weight_decay": 1e-3, **kwargs}
    return TorchClient(cid, model_fn, x, y, **settings)


class _ClipNorm(Transform):
    """Client-side transform that also records the order it sees clients in."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def client(self, update, config):
        self.seen.append(update.client_id)
        update.delta = update.delta / max(1.0, float(np.linalg.norm(update.delta)) / 0.5)
        return update


def _run(pool, strategy, rounds=3, transforms=(), model_fn=_mlp):
    torch.manual_seed(0)
    server = Server(pool, strategy, state_of(model_fn()), sampler=ClientSampler(fraction=0.5, seed=2), seed=4,
                    transforms=transforms, anomaly_checks=None)
    try:
        server.run(rounds)
    finally:
        pool.close()
    return server


FAULTS = FaultInjector(crash_rate=0.1, straggler_rate=0.4, seed=3)


@pytest.mark.parametrize("strategy", [FedAvg(), FedProx(mu=0.5)], ids=["fedavg", "fedprox"])
def test_vectorized_cohort_matches_sequential_pool(strategy):
    assert SIZES[0] * 5 < SIZES[-1]  # the cohort mixes small and large clients
    reference = _run(InProcessPool(_client, DATA.client_ids, FAULTS), strategy)
    vectorized = _run(make_pool("vectorized", _client, DATA.client_ids, FAULTS), strategy)
    relative = np.abs(vectorized.params - reference.params).max() / np.abs(reference.params).max()
    assert 0 < relative < 1e-5  # batched kernels round differently, but only just
    for a, b in zip(reference.history.rounds, vectorized.history.rounds):
        assert a.participants == b.participants and a.failures == b.failures
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-5)
    assert any(f.kind == "crash" for r in reference.history.rounds for f in r.failures)


def _frozen_body() -> torch.nn.Module:
    """A pretrained-style model: the first layer frozen (left out of the global state), the rest trained."""
    torch.manual_seed(7)
    model = MLP(64, 10, hidden=(16,))
    model[1].requires_grad_(False)
    return model


def test_vectorized_cohort_trains_an_adapter_only_state_like_the_sequential_pool(caplog):
    """A global state of the trainable entries only (as a LoRA model federates its adapters and head): the
    cohort engine batches it, frozen weights taken from the model, and matches the sequential pool."""
    frozen = _frozen_body()
    trainable = OrderedDict((k, v) for k, v in state_of(frozen).items() if not k.startswith("1."))

    def run(pool):
        server = Server(pool, FedAvg(), trainable, sampler=ClientSampler(fraction=0.5, seed=2), seed=4,
                        anomaly_checks=None)
        try:
            server.run(2)
        finally:
            pool.close()
        return server

    def client(cid):
        return _client(cid, _frozen_body, momentum=0.0, weight_decay=0.0)

    with caplog.at_level(logging.WARNING, logger="fedlearn.simulation.vectorized"):
        vectorized = run(make_pool("vectorized", client, DATA.client_ids))
    reference = run(InProcessPool(client, DATA.client_ids))
    assert not caplog.records                                   # no fall-back: the cohort really was batched
    assert list(vectorized.state) == ["3.weight", "3.bias"]     # the frozen layer never entered the state
    relative = np.abs(vectorized.params - reference.params).max() / np.abs(reference.params).max()
    assert 0 < relative < 1e-5


class _Normed(torch.nn.Sequential):
    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


class _Dropped(torch.nn.Sequential):
    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(64, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def test_models_it_cannot_vectorise_fall_back_with_a_log_line(caplog):
    def normed(cid):
        return _client(cid, _Normed)

    def dropped(cid):
        return _client(cid, _Dropped)

    with caplog.at_level(logging.WARNING, logger="fedlearn.simulation.vectorized"):
        fallback = _run(make_pool("vectorized", normed, DATA.client_ids), FedAvg(), rounds=2, model_fn=_Normed)
        reference = _run(InProcessPool(normed, DATA.client_ids), FedAvg(), rounds=2, model_fn=_Normed)
        np.testing.assert_array_equal(fallback.params, reference.params)
        before = state_of(_Dropped())
        dropout = _run(make_pool("vectorized", dropped, DATA.client_ids), FedAvg(), rounds=1, model_fn=_Dropped)
    messages = [r.getMessage() for r in caplog.records]
    assert any("_Normed has buffers" in m for m in messages)
    assert any("cannot vectorise _Dropped" in m for m in messages)
    assert dropout.history.rounds[0].metrics["clients_used"] == 12 and np.isfinite(dropout.params).all()
    assert dropout.params.shape == np.concatenate([v.ravel() for v in before.values()]).shape


def test_process_pool_is_identical_to_sequential_pool_with_transforms_in_cohort_order():
    order_seq, order_proc = _ClipNorm(), _ClipNorm()
    reference = _run(InProcessPool(_client, DATA.client_ids, FAULTS), FedProx(mu=0.1), transforms=[order_seq])
    processes = _run(make_pool("process", _client, DATA.client_ids, FAULTS, workers=2), FedProx(mu=0.1),
                     transforms=[order_proc])
    np.testing.assert_array_equal(processes.params, reference.params)
    assert order_proc.seen == order_seq.seen and len(order_seq.seen) > 20
    assert [r.failures for r in processes.history.rounds] == [r.failures for r in reference.history.rounds]


@pytest.fixture(scope="module")
def local_ray():
    """Ray on two local CPUs, started once for this module's Ray tests; its workers import the test modules
    (this one and its helpers) to rebuild clients and handlers."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", path)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


def test_ray_pool_on_two_local_cpus_matches_sequential_pool(local_ray):
    from fedlearn.simulation.ray_pool import RayPool

    pool = RayPool(InProcessPool(_client, DATA.client_ids, FAULTS))
    assert pool.size == 2
    remote = _run(pool, FedAvg(), rounds=2)
    reference = _run(InProcessPool(_client, DATA.client_ids, FAULTS), FedAvg(), rounds=2)
    np.testing.assert_array_equal(remote.params, reference.params)


def test_ray_actors_run_evaluation_secure_aggregation_and_he_stages(local_ray, tmp_path):
    pytest.importorskip("tenseal")
    from fedlearn.he import HEClient, HEConfig, HEProtocol, create_keys
    from fedlearn.simulation.ray_pool import RayPool
    from test_worker_stages import DIM, Both, Halve, quantum, recording, stage_calls

    n, log_file, halve = 6, tmp_path / "calls", Halve()
    ids = [str(i) for i in range(n)]
    identities = Identities.generate(ids)  # private keys travel to the actors (as raw bytes)
    secret, public = create_keys()  # so does the CKKS secret context
    handlers = recording({**SecAggClient(identities.sign, identities.registry).handlers(),
                          **HEClient(secret).handlers()}, log_file)
    pool = RayPool(InProcessPool(Both, ids, handlers=handlers), transforms=[halve])
    try:
        state = OrderedDict(w=np.linspace(-1, 1, DIM))
        evaluated = pool.evaluate(state, {cid: {"round": 1} for cid in ids})
        server = Server(pool, FedAvg(), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                        protocol=SecAggProtocol(SecAggConfig(graph="full"), identities.registry, seed=1),
                        anomaly_checks=None, transforms=[halve])
        server.run(1)
        encrypted = Server(pool, FedAvg(), zero_state(DIM), sampler=ClientSampler(fraction=1.0),
                           protocol=HEProtocol(HEConfig(), public), anomaly_checks=None, transforms=[halve])
        encrypted.run(1)
    finally:
        pool.close()
    assert [r.metrics["score"] for r in evaluated] == pytest.approx(
        [float(state["w"] @ known_delta(c, DIM)) for c in ids], rel=1e-12)
    assert os.getpid() not in {r.metrics["pid"] for r in evaluated}
    plain = sum(known_delta(c, DIM) for c in ids) / 2
    assert np.abs(server.protocol.last_sum - plain).max() <= n * quantum(n)
    np.testing.assert_allclose(encrypted.params, plain / n, rtol=0, atol=1e-6)  # the plain mean, halved
    calls = stage_calls(log_file)
    assert {stage.split("/")[0] for stage, _, _ in calls} == {"secagg", "he"}
    pids = {pid for _, _, pid in calls}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_backend_setting_reaches_the_pool_and_bad_names_are_refused():
    small = {"num_clients": 12, "clients_per_round": 6, "rounds": 2, "local_epochs": 1, "eval_clients": 0}
    sequential = simulate(small).final_state
    for backend in ("vectorized", "process"):
        other = simulate({**small, "backend": backend}).final_state
        for name, value in sequential.items():
            np.testing.assert_allclose(other[name], value, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="backend must be one of"):
        simulate({**small, "backend": "gpu-cluster"})
    with pytest.raises(ConfigError, match="ray_address needs backend 'ray'"):
        simulate({**small, "ray_address": "auto"})


def test_worker_messages_round_trip_and_refuse_objects():
    instructions = {"a": {"round": 3, "seed": 7, "lr": 0.5, "name": "x", "flag": True, "mu": np.float32(0.25)},
                    "b": {"round": 3, "gradient_correction": np.arange(4.0)}}
    back = decode_instructions(encode_instructions(instructions))
    assert back["a"] == {"round": 3, "seed": 7, "lr": 0.5, "name": "x", "flag": True, "mu": 0.25}
    np.testing.assert_array_equal(back["b"]["gradient_correction"], np.arange(4.0))
    with pytest.raises(SerializationError, match="numbers, strings, booleans and numpy arrays"):
        encode_instructions({"a": {"callback": print}})
    results = [Update("a", 2, np.arange(3.0), 5, {"train_loss": float("nan")}, partial=True,
                      extras={"mean_gradient": np.ones(3)}),
               Failure("b", "crash", "disk full")]
    a, b = decode_results(encode_results(results))
    assert (a.client_id, a.round, a.num_examples, a.partial) == ("a", 2, 5, True) and np.isnan(a.metrics["train_loss"])
    np.testing.assert_array_equal(a.extras["mean_gradient"], np.ones(3))
    assert b == results[1]
    with pytest.raises(SerializationError, match="neither an update nor a failure"):
        decode_results(encode_tensors({}, {"kind": "fit-results", "results": [{"update": 3}]}))


def test_the_cohort_schedule_is_the_batches_train_local_draws_for_each_client():
    """Sizes under, at and over a batch, several epochs, a straggler's cut-short epoch and an unshuffled client:
    every (client, step) row set and its padding are those of `batch_indices` with the client's own generator."""
    from fedlearn.simulation.cohort_sgd import Member, _schedule
    from fedlearn.torch.train import batch_indices

    batch = 4
    cases = [(1, 3, 11), (4, 1, 12), (5, 2, 13), (9, 7, None), (9, 3, 14), (16, 4, 15), (3, 1, 16)]
    members = [Member(torch.full((n, 2), float(k)), torch.zeros(n, dtype=torch.long), steps, seed)
               for k, (n, steps, seed) in enumerate(cases)]
    x, _, index, mask = _schedule(members, batch)
    assert index.shape == (len(cases), 7, batch) and mask.shape == index.shape
    offset = 0
    for k, (n, steps, seed) in enumerate(cases):
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        expected = list(batch_indices(n, batch, steps, generator))
        assert len(expected) == steps
        for t in range(index.shape[1]):
            real = int(mask[k, t].sum())
            if t >= steps:
                assert real == 0 and (index[k, t] == offset).all()   # a finished client reads its first row
                continue
            assert real == len(expected[t]) and mask[k, t, :real].all()
            assert index[k, t, :real].tolist() == (expected[t] + offset).tolist()
            assert (index[k, t, real:] == offset).all()
            assert (x[index[k, t]] == k).all()                         # every row is this client's own data
        offset += n


class _SmallCNN(torch.nn.Sequential):
    """Padding, stride, pooling with a ceiling, a frozen-free plain Sequential: the grouped-layer path."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2, ceil_mode=True),
                         torch.nn.Conv2d(4, 3, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                         torch.nn.Linear(12, 5))


def test_grouped_layers_give_each_clients_own_outputs_and_refuse_other_models():
    from fedlearn.simulation.grouped import grouped_forward

    torch.manual_seed(0)
    models = [_SmallCNN() for _ in range(3)]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    x = torch.randn(3, 5, 2, 9, 9)
    out = grouped_forward(models[0], {})(params, x)
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x[k]), rtol=1e-5, atol=1e-6)
    frozen = {"0.weight": params.pop("0.weight")[1]}  # one shared, frozen first layer
    models[0][0].weight.data.copy_(frozen["0.weight"])
    torch.testing.assert_close(grouped_forward(models[0], frozen)(params, x)[0], models[0](x[0]), rtol=1e-5, atol=1e-6)
    assert grouped_forward(_Normed(), {}) is None and grouped_forward(_Dropped(), {}) is None


def test_a_cnn_cohort_trains_like_the_sequential_pool():
    rng = np.random.default_rng(5)
    data = {f"c{i}": (rng.normal(size=(n, 2, 9, 9)).astype(np.float32), rng.integers(0, 5, n))
            for i, n in enumerate([3, 9, 17, 30, 6, 12])}

    def client(cid):
        x, y = data[cid]
        return TorchClient(cid, _SmallCNN, x, y, batch_size=8, lr=0.1, local_epochs=2, momentum=0.5)

    def run(pool):
        torch.manual_seed(0)
        server = Server(pool, FedAvg(), state_of(_SmallCNN()), sampler=ClientSampler(count=4, seed=1), seed=3)
        try:
            server.run(2)
        finally:
            pool.close()
        return server

    reference = run(InProcessPool(client, list(data), FAULTS))
    vectorized = run(make_pool("vectorized", client, list(data), FAULTS))
    relative = np.abs(vectorized.params - reference.params).max() / np.abs(reference.params).max()
    assert 0 < relative < 1e-5
    assert [r.participants for r in reference.history.rounds] == [r.participants for r in vectorized.history.rounds]
