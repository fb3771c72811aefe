"""One task written once as an `App` runs in `run_simulation`, `fedlearn simulate --app` and `fedlearn server`
([app] section), gives the same model in simulation and deployment, and a client with another model is
refused when it connects, naming the first differing parameter."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from app_support import digits_model, make_app
from fedlearn import App, Client, FedAvg, RunStore, Update, run_simulation
from fedlearn.cli import main as fedlearn_main
from fedlearn.config import SimulationConfig
from fedlearn.data import federate, load_breast_cancer, load_digits
from fedlearn.strategies import weighted_mean
from fedlearn.torch import TorchClient
from fedlearn.transport import ClientBundle, certs
from fedlearn.transport.client_process import ClientRejected, run_client
from fedlearn.transport.server_process import ServerSettings, serve_app
from transport_support import wait_for

TESTS = Path(__file__).resolve().parent


def test_a_federated_dataset_and_a_model_function_are_enough():
    fds = federate(load_breast_cancer(seed=0), "iid", 3, seed=0)
    result = run_simulation(data=fds, model_fn=lambda: torch.nn.Linear(30, 2), rounds=3)
    assert result.accuracy > 0.9
    x, y = fds.test  # the server's evaluation is on the data set's test split
    weight, bias = result.final_state["weight"], result.final_state["bias"]
    assert result.accuracy == pytest.approx(np.mean((x @ weight.T + bias).argmax(axis=1) == y), abs=1e-9)
    assert len(result.history.metric("test_accuracy")) == 3


def test_strategies_by_name_and_a_wrong_name_lists_the_valid_ones():
    fds = federate(load_digits(seed=0), "iid", 3, seed=0)
    yogi = run_simulation(data=fds, model_fn=digits_model, rounds=2, strategy="fedyogi")
    plain = run_simulation(data=fds, model_fn=digits_model, rounds=2)
    assert not np.allclose(yogi.final_state["0.weight"], plain.final_state["0.weight"])  # the server optimizer ran
    with pytest.raises(ValueError, match=r"unknown strategy 'fedyogo'.*'fedyogi'"):
        run_simulation(data=fds, model_fn=digits_model, rounds=1, strategy="fedyogo")


class _Constant(Client):
    """Sends the same delta every round, so one FedAvg step moves the model by the aggregate of the values."""

    def __init__(self, cid: str, value: float) -> None:
        super().__init__(cid)
        self.value = value

    def fit(self, state, config) -> Update:
        return Update(self.cid, config["round"], np.full(2, self.value), 1)


def test_aggregators_by_name_replace_the_mean_and_a_wrong_name_lists_the_valid_ones():
    values = {"a": 0.1, "b": 0.2, "c": 5.0}
    strategy = FedAvg()
    parts = dict(client_fn=lambda cid: _Constant(cid, values[cid]), client_ids=list(values), rounds=1,
                 initial_state=OrderedDict(w=np.zeros(2)), anomaly_checks=None)
    median = run_simulation(**parts, strategy=strategy, aggregator="median")
    np.testing.assert_allclose(median.final_state["w"], [0.2, 0.2], rtol=1e-12)  # np.median of the three values
    assert strategy.aggregator is weighted_mean  # the caller's strategy object is left as it was
    mean = run_simulation(**parts, strategy=strategy)
    np.testing.assert_allclose(mean.final_state["w"], [5.3 / 3] * 2, rtol=1e-12)
    with pytest.raises(ValueError, match=r"unknown aggregator 'medain'.*'median'.*'trimmed_mean'"):
        run_simulation(**parts, aggregator="medain")
    with pytest.raises(ValueError, match="fednova.*own rule"):
        run_simulation(**parts, strategy="fednova", aggregator="median")


def test_an_unknown_metric_names_the_recorded_ones():
    result = run_simulation(app=make_app(num_clients=2), rounds=1)
    with pytest.raises(KeyError, match=r"'accuracy'.*test_accuracy"):
        result.history.metric("accuracy")


def test_the_same_app_in_run_simulation_and_fedlearn_simulate(tmp_path, capsys):
    expected = run_simulation(app=make_app(num_clients=3), rounds=2, seed=0)
    code = fedlearn_main(["simulate", "--quiet", "--app", "app_support:make_app", "--app-arg", "num_clients=3",
                          "--app-dir", str(TESTS), "--rounds", "2", "--fraction", "1", "--eval-clients", "0",
                          "--run-dir", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / "cli")
    state, _ = store.load_round(2)
    assert store.get_meta("config")["app"]["factory"] == "app_support:make_app"
    store.close()
    for name, value in expected.final_state.items():
        np.testing.assert_array_equal(state[name], value)
    # the [app] section of a config file does the same
    (tmp_path / "run.toml").write_text(f'rounds = 2\n[sampling]\nfraction = 1.0\neval_clients = 0\n'
                                       f'[app]\nfactory = "app_support:make_app"\ndir = "{TESTS}"\nnum_clients = 3\n')
    assert fedlearn_main(["simulate", "--quiet", "--config", str(tmp_path / "run.toml"),
                          "--run-dir", str(tmp_path / "toml")]) == 0
    assert capsys.readouterr().out.count(f"final test accuracy: {expected.accuracy:.4f}") == 2


def test_built_in_task_settings_beside_an_app_are_refused(capsys):
    code = fedlearn_main(["simulate", "--quiet", "--app", "app_support:make_app", "--app-dir", str(TESTS),
                          "--dataset", "breast_cancer", "--lr", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "would be ignored: dataset, lr" in err


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("app") / "creds"
    certs.create(out, ["0", "1"])
    return out


def _settings(tmp_path: Path, creds: Path) -> ServerSettings:
    return ServerSettings(address="127.0.0.1:0", run_dir=str(tmp_path / "run"), certificate=str(creds / "server.pem"),
                          private_key=str(creds / "server.key"), allow_list=str(creds / "allowlist.txt"),
                          round_deadline=60, wait_for_clients=2, wait_timeout=60)


def test_the_app_served_to_client_processes_gives_the_simulated_model(tmp_path, creds):
    cfg = SimulationConfig.from_dict({"rounds": 2, "clients_per_round": 2, "eval_clients": 0,
                                      "app": {"factory": "app_support:make_app", "dir": str(TESTS),
                                              "num_clients": 2}})
    outcome, listening = {}, threading.Event()
    server = threading.Thread(target=lambda: outcome.update(result=serve_app(
        cfg, _settings(tmp_path, creds), on_listening=lambda p: (outcome.update(port=p), listening.set()))))
    server.start()
    assert listening.wait(30)
    app = make_app(num_clients=2)  # each client process builds its own copy of the task
    clients = [threading.Thread(target=run_client, args=(app.client(cid), f"127.0.0.1:{outcome['port']}"),
                                kwargs={"identity": ClientBundle.load(creds / "clients" / cid).identity,
                                        "tls": ClientBundle.load(creds / "clients" / cid).tls, "retry_for": 30})
               for cid in ("0", "1")]
    for c in clients:
        c.start()
    server.join(120)
    for c in clients:
        c.join(30)
    expected = run_simulation(app=make_app(num_clients=2), rounds=2, clients_per_round=2, anomaly_checks=None)
    for name, value in expected.final_state.items():
        np.testing.assert_allclose(outcome["result"].final_state[name], value, atol=1e-6)
    assert outcome["result"].accuracy == pytest.approx(expected.accuracy, abs=0.01)


def test_a_client_with_another_model_is_refused_at_connection_naming_the_parameter(tmp_path, creds):
    cfg = SimulationConfig.from_dict({"rounds": 1, "clients_per_round": 1, "eval_clients": 0,
                                      "app": {"factory": "app_support:make_app", "dir": str(TESTS),
                                              "num_clients": 2}})
    settings = _settings(tmp_path, creds)
    settings.wait_for_clients, settings.wait_timeout = 1, 8
    outcome, listening = {}, threading.Event()

    def serve():
        try:
            serve_app(cfg, settings, on_listening=lambda p: (outcome.update(port=p), listening.set()))
        except Exception as exc:  # no client ever joins: the server gives up after wait_timeout
            outcome["error"] = exc

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert listening.wait(30)
        x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
        wrong = TorchClient("0", lambda: digits_model(hidden=16), x, y)
        bundle = ClientBundle.load(creds / "clients" / "0")
        start = time.monotonic()
        with pytest.raises(ClientRejected) as refused:
            run_client(wrong, f"127.0.0.1:{outcome['port']}", identity=bundle.identity, tls=bundle.tls, retry_for=10)
        assert time.monotonic() - start < 5  # at connection, not after failed rounds
        assert "parameter '0.weight' has shape (32, 64) in the server's model but (16, 64) in client '0'" \
               in str(refused.value)
    finally:
        server.join(60)
    assert "error" in outcome and not (tmp_path / "run" / "metrics.csv").exists()  # no round ran


def test_an_app_needs_a_model():
    with pytest.raises(ValueError, match="model_fn or initial_state"):
        App(strategy="fedavg")


def test_the_apps_fit_config_reaches_every_client_with_each_task():
    x, y = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32), np.arange(20) % 10
    app = App(model_fn=digits_model, client_fn=lambda cid: TorchClient(cid, digits_model, x, y, lr=0.5),
              client_ids=["0", "1"], fit_config={"lr": 0.0})  # the server's lr overrides the client's default
    result = run_simulation(app=app, rounds=1)
    for name, value in app.initial().items():
        np.testing.assert_array_equal(result.final_state[name], value)
