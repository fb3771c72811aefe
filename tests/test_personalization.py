"""Personalisation: FedPer / FedRep / Ditto / fine-tuning clients, the per-client state store, exact resume,
per-client reports, and the Shakespeare-by-role loader."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedlearn
from fedlearn.data import load_digits
from fedlearn.data.shakespeare import load_shakespeare, speeches_by_role
from fedlearn.personalization import (
    ClientStateStore, PersonalTorchClient, compare, local_names, per_client_metric, shared_state,
)
from fedlearn.torch import TorchClient
from fedlearn.torch.train import batch_indices

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


class Net(nn.Module):
    def __init__(self, d_in: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def permuted_digits(num_clients: int = 8) -> dict[str, tuple]:
    """Digits split IID, each client with its own label permutation: one global model cannot serve them all,
    a personal head can (the body's features are shared)."""
    data = load_digits(seed=0)
    x, y = data.x_train, data.y_train
    rng = np.random.default_rng(0)
    parts = np.array_split(rng.permutation(len(y)), num_clients)
    out = {}
    for k, rows in enumerate(parts):
        perm = rng.permutation(10) if k else np.arange(10)
        cut = int(0.75 * len(rows))
        out[str(k)] = (x[rows[:cut]], perm[y[rows[:cut]]], x[rows[cut:]], perm[y[rows[cut:]]])
    return out


# -- the state store ---------------------------------------------------------------------------------------
def test_state_store_returns_the_newest_version_before_a_round_and_keeps_two(tmp_path):
    store = ClientStateStore(tmp_path / "s")
    for rnd in (1, 3, 6):
        store.save("a/../b", rnd, {"w": np.full(2, float(rnd))})
    assert store.load("a/../b", before=6)["w"][0] == 3.0       # what round 6 started from
    assert store.load("a/../b")["w"][0] == 6.0
    assert store.load("a/../b", before=3) is None              # round 1 was pruned: only two versions kept
    assert store.load("nobody") is None
    assert store.clients() == ["a/../b"]
    assert len(list((tmp_path / "s").iterdir())) == 1          # one folder, inside the root, for the odd id
    store.save("a/../b", 6, {"w": np.zeros(2)})                # a replayed round overwrites its version
    assert store.load("a/../b")["w"][0] == 0.0
    with pytest.raises(ValueError, match="round must be >= 0"):
        store.save("x", -1, {"w": np.zeros(1)})


# -- what leaves the client --------------------------------------------------------------------------------
def test_fedper_sends_only_the_body_and_keeps_each_clients_head(tmp_path):
    data = permuted_digits(2)
    store = ClientStateStore(tmp_path)
    glob = shared_state(Net, ["head"])
    assert list(glob) == ["body.0.weight", "body.0.bias"]
    heads = {}
    for cid in ("0", "1"):
        x, y, _, _ = data[cid]
        client = PersonalTorchClient(cid, Net, x, y, store=store, method="fedper", local=["head"], lr=0.1)
        update = client.fit(glob, {"round": 1, "seed": 1})
        assert update.delta.shape == (64 * 32 + 32,)            # the body's size: the head never travels
        assert np.abs(update.delta).sum() > 0
        heads[cid] = store.load(cid)
        assert list(heads[cid]) == ["head.weight", "head.bias"]
    assert not np.allclose(heads["0"]["head.weight"], heads["1"]["head.weight"])
    with pytest.raises(ValueError, match="match nothing"):
        local_names(Net(), ["haed"])
    with pytest.raises(ValueError, match="needs `local`"):
        PersonalTorchClient("0", Net, data["0"][0], data["0"][1], store=store, method="fedrep")


def _manual_sgd(model: nn.Module, x, y, params, seed: int, steps: int, lr: float) -> None:
    """Plain torch SGD over the same batches `train_local` draws: the independent reference."""
    opt = torch.optim.SGD(params, lr=lr)
    for idx in batch_indices(len(x), 16, steps, torch.Generator().manual_seed(seed)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(tmp_path):
    x, y, _, _ = permuted_digits(2)["1"]
    glob = shared_state(Net, ["head"], seed=0)
    client = PersonalTorchClient("1", Net, x, y, store=ClientStateStore(tmp_path), method="fedrep", local=["head"],
                                 head_epochs=2, local_epochs=1, batch_size=16, lr=0.1)
    update = client.fit(glob, {"round": 1, "seed": 5})

    torch.manual_seed(0)
    ref = Net()                                                   # same initial head (init_seed 0) and body
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    batches = -(-len(x) // 16)
    _manual_sgd(ref, xt, yt, list(ref.head.parameters()), 5, 2 * batches, 0.1)
    _manual_sgd(ref, xt, yt, list(ref.body.parameters()), 5, batches, 0.1)
    body_delta = np.concatenate([(ref.body[0].weight.detach().numpy() - glob["body.0.weight"]).ravel(),
                                 ref.body[0].bias.detach().numpy() - glob["body.0.bias"]])
    np.testing.assert_allclose(update.delta, body_delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(client.store.load("1")["head.weight"], ref.head.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_final_adaptation_retrains_a_stale_head_on_the_final_body_with_the_body_frozen(tmp_path):
    """`personalize` at the end of training: the head this client saved in round 1 is trained alone on the
    final global body (an independent torch SGD over the same batches), saved as the next round's, and is
    what evaluation then uses."""
    x, y, xt, yt = permuted_digits(2)["1"]
    store = ClientStateStore(tmp_path)
    client = PersonalTorchClient("1", Net, x, y, x_test=xt, y_test=yt, store=store, method="fedper",
                                 local=["head"], head_epochs=2, batch_size=16, lr=0.1)
    client.fit(shared_state(Net, ["head"], seed=0), {"round": 1, "seed": 1})
    stale = store.load("1")
    final = shared_state(Net, ["head"], seed=7)                   # a body the stale head has never seen
    client.personalize(final, {"round": 9, "seed": 4})

    ref = Net()
    ref.load_state_dict({**{k: torch.as_tensor(v) for k, v in final.items()},
                         **{k: torch.as_tensor(v) for k, v in stale.items()}})
    _manual_sgd(ref, torch.as_tensor(x), torch.as_tensor(y), list(ref.head.parameters()), 4, 2 * -(-len(x) // 16), 0.1)
    saved = store.load("1")
    assert store._versions("1") == [1, 9]
    np.testing.assert_allclose(saved["head.weight"], ref.head.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(client.personal_model(final, {}).body[0].weight.detach().numpy(),
                                  final["body.0.weight"])          # the body stayed the global one
    assert client.evaluate(final, {})["accuracy"] == pytest.approx(
        fedlearn.torch.train.evaluate_model(ref, torch.as_tensor(xt), torch.as_tensor(yt))["accuracy"])


def test_a_ditto_client_never_sampled_adapts_in_the_final_pass(tmp_path):
    """A fresh client process (no module built yet, nothing saved) runs the final pass from the global model."""
    x, y, xt, yt = permuted_digits(2)["1"]
    glob = shared_state(Net, [])
    client = PersonalTorchClient("1", Net, x, y, x_test=xt, y_test=yt, store=ClientStateStore(tmp_path),
                                 method="ditto", ditto_lambda=0.1, local_epochs=3, batch_size=16, lr=0.1)
    client.personalize(glob, {"round": 5, "seed": 0})
    assert client.evaluate(glob, {})["accuracy"] > client.evaluate(glob, {"personalized": False})["accuracy"] + 0.3


def test_finetuning_with_a_held_out_share_keeps_the_global_model_when_tuning_hurts(tmp_path):
    x, y, xt, yt = permuted_digits(2)["0"]                        # identity labels: the global model is right
    fn = lambda cid: TorchClient(cid, Net, x, y, batch_size=16, lr=0.1, local_epochs=8)  # noqa: E731
    glob = fedlearn.run_simulation(fn, ["0"], initial_state=shared_state(Net, []), rounds=1,
                                   anomaly_checks=None).final_state

    def tuned(lr: float, validation: float) -> nn.Module:
        client = PersonalTorchClient("0", Net, x, y, x_test=xt, y_test=yt, store=ClientStateStore(tmp_path),
                                     method="finetune", finetune_epochs=3, finetune_lr=lr,
                                     finetune_validation=validation, batch_size=16)
        return client.personal_model(glob, {"seed": 0})

    def accuracy(model: nn.Module) -> float:
        return fedlearn.torch.train.evaluate_model(model, torch.as_tensor(xt), torch.as_tensor(yt))["accuracy"]

    global_acc = accuracy(PersonalTorchClient("0", Net, x, y, store=ClientStateStore(tmp_path),
                                              method="finetune").full_model(glob, None))
    assert global_acc > 0.85
    assert accuracy(tuned(20.0, 0.0)) < global_acc - 0.3          # a destructive lr, applied blindly
    kept = tuned(20.0, 0.25)                                      # the held-out share rejects every epoch
    for name, value in glob.items():
        np.testing.assert_array_equal(kept.state_dict()[name].numpy(), value)
    x, y, xt, yt = permuted_digits(2)["1"]                        # permuted labels: tuning helps, and is kept
    assert accuracy(tuned(0.1, 0.25)) > accuracy(kept) + 0.3
    with pytest.raises(ValueError, match="finetune_validation"):
        PersonalTorchClient("0", Net, x, y, store=ClientStateStore(tmp_path), method="finetune", finetune_validation=1.0)


def test_ditto_personal_model_follows_the_proximal_gradient_by_hand(tmp_path):
    """Linear regression, full-batch GD, two steps: v1 = w - lr*g(w); v2 = v1 - lr*(g(v1) + lam*(v1 - w))."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    t = rng.normal(size=(12, 1)).astype(np.float32)
    lr, lam = 0.1, 2.0

    def model_fn() -> nn.Module:
        return nn.Linear(3, 1, bias=False)

    def mse(out, target, reduction="mean"):
        return nn.functional.mse_loss(out, target, reduction=reduction)

    w = {"weight": np.array([[0.3, -0.2, 0.5]], dtype=np.float32)}
    client = PersonalTorchClient("c", model_fn, x, t, store=ClientStateStore(tmp_path), method="ditto",
                                 ditto_lambda=lam, loss_fn=mse, local_epochs=2, batch_size=12, lr=lr, shuffle=False)
    client.fit(OrderedDict(w), {"round": 1})

    def grad(v):  # d/dv mean((x v^T - t)^2) = 2/n * (x v^T - t)^T x
        return 2.0 / len(x) * ((x @ v.T - t).T @ x)

    w0 = w["weight"].astype(np.float64)
    v1 = w0 - lr * grad(w0)
    v2 = v1 - lr * (grad(v1) + lam * (v1 - w0))
    np.testing.assert_allclose(client.store.load("c")["weight"], v2, rtol=1e-5)


# -- accuracy: personal heads serve clients whom no single model can -------------------------------------
def test_fedper_and_ditto_beat_fedavg_per_client_on_permuted_labels(tmp_path):
    data = permuted_digits(8)
    ids = list(data)

    def factory(method: str | None):
        store = ClientStateStore(tmp_path / str(method))

        def client_fn(cid: str) -> TorchClient:
            x, y, xt, yt = data[cid]
            common = dict(x_test=xt, y_test=yt, local_epochs=2, batch_size=16, lr=0.1)
            if method is None:
                return TorchClient(cid, Net, x, y, **common)
            return PersonalTorchClient(cid, Net, x, y, store=store, method=method, local=["head"], **common)
        return client_fn

    def train(method: str | None, local: list[str]):
        fn = factory(method)
        res = fedlearn.run_simulation(fn, ids, initial_state=shared_state(Net, local), rounds=12,
                                      clients_per_round=8, seed=0, anomaly_checks=None)
        return per_client_metric(fn, ids, res.final_state)

    base = train(None, [])
    fedper = compare(train("fedper", ["head"]), base)
    ditto = compare(train("ditto", []), base)
    assert np.mean(list(base.values())) < 0.45                    # one global model cannot fit 8 labelings
    assert fedper.gain > 0.35 and fedper.fraction_hurt <= 0.125   # client "0" has the identity labels
    assert ditto.gain > 0.25 and ditto.mean > 0.7


def test_exact_resume_after_a_crash_inside_a_round_with_saved_heads(tmp_path):
    """Kill the run inside round 4 after one client already saved its round-4 head; resuming replays round 4
    from the heads as they were before it and ends exactly where an uninterrupted run ends."""
    data = permuted_digits(4)
    ids = list(data)

    def client_fn_for(store: ClientStateStore, crash_at: dict | None = None):
        def client_fn(cid: str) -> PersonalTorchClient:
            x, y, xt, yt = data[cid]
            client = PersonalTorchClient(cid, Net, x, y, x_test=xt, y_test=yt, store=store, method="fedper",
                                         local=["head"], batch_size=16, lr=0.1)
            if crash_at is not None:
                fit = client.fit

                def crashing_fit(state, config):
                    if config["round"] == 4 and cid == ids[1] and crash_at.pop("armed", False):
                        raise KeyboardInterrupt  # escapes the pool, like a kill of the process
                    return fit(state, config)
                client.fit = crashing_fit
            return client
        return client_fn

    def run(run_dir: Path, client_fn, rounds: int):
        return fedlearn.run_simulation(client_fn, ids, initial_state=shared_state(Net, ["head"]), rounds=rounds,
                                       clients_per_round=3, seed=0, run_dir=run_dir, anomaly_checks=None)

    whole_store = ClientStateStore(tmp_path / "whole" / "client_state")
    whole = run(tmp_path / "whole", client_fn_for(whole_store), 6)
    crash_store = ClientStateStore(tmp_path / "crash" / "client_state")
    flag = {"armed": True}
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash", client_fn_for(crash_store, flag), 6)
    resumed = run(tmp_path / "crash", client_fn_for(crash_store), 6)
    for name in whole.final_state:
        np.testing.assert_array_equal(resumed.final_state[name], whole.final_state[name])
    for cid in ids:
        for name, value in whole_store.load(cid).items():
            np.testing.assert_array_equal(crash_store.load(cid)[name], value)


def test_finetune_evaluates_the_global_model_after_local_epochs(tmp_path):
    x, y, xt, yt = permuted_digits(2)["1"]
    glob = shared_state(Net, [])
    ft = PersonalTorchClient("1", Net, x, y, x_test=xt, y_test=yt, store=ClientStateStore(tmp_path),
                             method="finetune", finetune_epochs=5, lr=0.1)
    assert ft.evaluate(glob, {"personalized": False})["accuracy"] < 0.3      # untrained global model
    assert ft.evaluate(glob, {})["accuracy"] > 0.6                          # five local epochs later


# -- per-client report -------------------------------------------------------------------------------------
def test_compare_reports_mean_tenth_percentile_and_fraction_hurt():
    r = compare({"a": 0.5, "b": 0.9, "c": 0.8}, {"a": 0.6, "b": 0.7, "c": 0.8})
    assert r.mean == pytest.approx(2.2 / 3)
    assert r.p10 == pytest.approx(0.5 + 0.2 * 0.3)   # numpy's linear interpolation between the two lowest
    assert r.fraction_hurt == pytest.approx(1 / 3)   # only "a" went down; "c" is equal, not hurt
    assert r.gain == pytest.approx(2.2 / 3 - 0.7)
    with pytest.raises(ValueError, match="same non-empty clients"):
        compare({"a": 1.0}, {"b": 1.0})


# -- Shakespeare by role -----------------------------------------------------------------------------------
def test_speeches_are_grouped_by_role_in_order():
    text = "ROMEO:\nBut soft!\nWhat light?\n\nJuliet:\nAy me.\n\nROMEO:\nShe speaks.\n"
    assert speeches_by_role(text) == {"ROMEO": "But soft!\nWhat light?\nShe speaks.", "JULIET": "Ay me."}


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/tinyshakespeare")
def test_shakespeare_roles_are_clients_with_next_character_labels():
    data = load_shakespeare(SHAKESPEARE, seq_len=10, stride=5, max_clients=5)
    assert len(data.client_ids) == 5 and data.num_classes == 65
    x, y = data.clients[data.client_ids[0]]
    assert x.shape[1] == 10 and x.dtype == np.int64
    np.testing.assert_array_equal(x[1, :5], x[0, 5:])              # windows step by the stride
    np.testing.assert_array_equal(y[0], x[1, 5])                   # the label is the next character
