"""Personalisation and federated LoRA deployed: `fedlearn server --app` and real client processes over gRPC
(TLS and authentication on). FedPer heads stay in each client's state store on its own disk and never
travel (the server's model and the bytes on the wire are the body's); LoRA runs exchange adapters and head
only, and give the model a simulation of the same app gives."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedlearn import Update, run_simulation
from fedlearn.serialize import decode_state, encode_state, encode_update
from fedlearn.server.store import RunStore
from fedlearn.torch import state_of
from fedlearn.torch.train import evaluate_model
from fedlearn.transport import certs
from transport_support import SERVER_SECTION, TESTS, fedlearn_process, free_port

import personal_app

ROUNDS = 3
RESULT = re.compile(r"event=result client=(\S+) round=(\d+) kind=fit bytes_in=(\d+) bytes_out=(\d+)")


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("personal") / "creds"
    certs.create(out, ["0", "1"])
    return out


def _deploy(tmp_path: Path, creds: Path, app: str, app_args: list[str], client_module: str,
            client_args: dict[str, list[str]]) -> dict[str, str]:
    """Serve `app` for ROUNDS rounds to two client processes; returns each client's log."""
    (tmp_path / "creds").symlink_to(creds)
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f"seed = 0\nrounds = {ROUNDS}\n[sampling]\nclients_per_round = 2\neval_clients = 0\n"
                      + SERVER_SECTION.format(port=port, deadline=60))
    server = fedlearn_process(["server", "--config", str(config), "--quiet", "--app", app, "--app-dir", str(TESTS),
                               *[a for kv in app_args for a in ("--app-arg", kv)]], tmp_path / "server.log")
    clients = [fedlearn_process(["client", "--server", f"127.0.0.1:{port}", "--credentials",
                                 str(creds / "clients" / cid), "--client-module", client_module,
                                 "--app-dir", str(TESTS), *[a for kv in client_args[cid] for a in ("--client-arg", kv)]],
                                tmp_path / f"client{cid}.log") for cid in ("0", "1")]
    try:
        codes = [p.wait(240) for p in (server, *clients)]
    finally:
        for p in (server, *clients):
            p.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("server", "client0", "client1")}
    assert codes == [0, 0, 0], logs
    return logs


def _fit_bytes(log: str) -> list[tuple[int, int]]:
    """(bytes in, bytes out) of every fit task a client log records."""
    return [(int(m.group(3)), int(m.group(4))) for m in RESULT.finditer(log)]


def test_fedper_heads_stay_on_each_clients_disk_and_never_travel(tmp_path, creds):
    state_dirs = {cid: tmp_path / f"client{cid}-disk" for cid in ("0", "1")}
    logs = _deploy(tmp_path, creds, "personal_app:make_fedper_app", [], "personal_app:make_fedper_client",
                   {cid: [f"state_dir={d}"] for cid, d in state_dirs.items()})

    store = RunStore(tmp_path / "run", readonly=True)
    try:
        final, _ = store.load_round(ROUNDS)
    finally:
        store.close()
    assert list(final) == ["body.0.weight", "body.0.bias"]   # the server never held a head

    # on the wire: each fit task and its answer are the size of the body, far below body + head
    body = personal_app.make_fedper_app().initial_state
    whole = state_of(personal_app.HeadNet())
    body_bytes = len(encode_update(Update("0", 1, np.zeros(sum(v.size for v in body.values()), np.float32), 1)))
    head_bytes = len(encode_state(whole)) - len(encode_state(body))
    assert head_bytes > 8000
    for cid in ("0", "1"):
        traffic = _fit_bytes(logs[f"client{cid}"])
        assert len(traffic) == ROUNDS
        for down, up in traffic:
            assert body_bytes <= up < body_bytes + head_bytes / 2
            assert down < len(encode_state(body)) + head_bytes / 2

    # each head is on its own client's disk, trained, and differs from the other client's
    heads = {}
    for cid, folder in state_dirs.items():
        saved = personal_app.ClientStateStore(folder).load(cid)
        assert saved is not None and set(saved) == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
        heads[cid] = saved
        client = personal_app.make_fedper_client(cid, str(folder))
        accuracy = evaluate_model(client.personal_model(final, {}), client.x_test, client.y_test)["accuracy"]
        assert accuracy > 0.6, (cid, accuracy)   # its labels are permuted: only its own head can score this
    assert not np.allclose(heads["0"]["head.2.weight"], heads["1"]["head.2.weight"])
    exported = decode_state((tmp_path / "run" / "final_model.flt").read_bytes())
    assert list(exported) == ["body.0.weight", "body.0.bias"]  # nor does the model it exports


def test_lora_adapters_only_travel_and_the_deployed_model_equals_the_simulated_one(tmp_path, creds):
    pytest.importorskip("peft")
    model_dir = personal_app.save_tiny_bert(tmp_path / "tiny-bert")
    logs = _deploy(tmp_path, creds, "personal_app:make_lora_app", [f"model_dir={model_dir}"],
                   "personal_app:make_lora_client", {cid: [f"model_dir={model_dir}"] for cid in ("0", "1")})

    store = RunStore(tmp_path / "run", readonly=True)
    try:
        final, _ = store.load_round(ROUNDS)
    finally:
        store.close()
    factory = personal_app.lora_factory(str(model_dir))
    assert final and all("lora_" in name or name.startswith("head.") for name in final)
    initial = factory.trainable_state()
    assert set(final) == set(initial)
    assert any(not np.allclose(final[k], initial[k]) for k in final if "lora_B" in k)  # adapters trained

    full = len(encode_state(state_of(factory.template)))
    adapters = len(encode_update(Update("0", 1, np.zeros(sum(v.size for v in initial.values()), np.float32), 1)))
    for cid in ("0", "1"):
        for down, up in _fit_bytes(logs[f"client{cid}"]):
            assert adapters <= up < 2 * adapters < full / 4 and down < full / 4

    app = personal_app.make_lora_app(str(model_dir))
    app.client_fn = lambda cid: personal_app.make_lora_client(cid, str(model_dir))
    app.client_ids = ["0", "1"]
    expected = run_simulation(app=app, rounds=ROUNDS, clients_per_round=2, anomaly_checks=None).final_state
    for name in expected:
        np.testing.assert_allclose(final[name], expected[name], atol=1e-5, err_msg=name)
