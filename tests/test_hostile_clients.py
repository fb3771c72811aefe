"""Registered clients that send hostile values, against a real `fedlearn server` process on loopback with
real `fedlearn client` processes beside them: every bad value costs only its sender (rejected with the
reason), a protocol failure costs only its round, and the run completes. Each hostile client is
`hostile_client.py`, a real process with its own credentials that signs what it sends."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedlearn import RunStore
from fedlearn.secagg import SecAggConfig
from fedlearn.transport import certs
from transport_support import fedlearn_process, free_port, hostile_process

CLIENTS = 5
SERVER_TOML = """
seed = 0
rounds = {rounds}
[data]
dataset = "digits"
num_clients = {clients}
[model]
name = "logreg"
[sampling]
clients_per_round = {clients}
eval_clients = 0
{sampling}
[client]
local_epochs = 1
[anomaly]
enabled = false
{sections}
[server]
address = "127.0.0.1:{port}"
run_dir = "run"
certificate = "creds/server.pem"
private_key = "creds/server.key"
allow_list = "creds/allowlist.txt"
round_deadline = 30
"""


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "creds"
    certs.create(out, [str(k) for k in range(CLIENTS)])
    return out


class Deployment:
    """A `fedlearn server` process and its clients: honest `fedlearn client` processes (constant updates of
    +1 from 10 examples) and hostile ones; `finish` waits for all and returns the committed rounds."""

    def __init__(self, folder: Path, creds: Path, *, rounds: int, sampling: str = "", sections: str = "") -> None:
        self.folder, self.creds, self.port = folder, creds, free_port()
        (folder / "creds").symlink_to(creds)
        config = folder / "server.toml"
        config.write_text(SERVER_TOML.format(rounds=rounds, clients=CLIENTS, port=self.port, sampling=sampling,
                                             sections=sections))
        self.processes = [fedlearn_process(["server", "--config", str(config), "--quiet"], folder / "server.log")]

    def honest(self, k: int, *flags: str) -> None:
        self.processes.append(fedlearn_process(
            ["client", "--server", f"127.0.0.1:{self.port}", "--credentials", str(self.creds / "clients" / str(k)),
             "--client-module", "transport_support:make_constant_client", *flags], self.folder / f"client{k}.log"))

    def hostile(self, k: int, *args: str) -> None:
        self.processes.append(hostile_process(
            ["--server", f"127.0.0.1:{self.port}", "--credentials", str(self.creds / "clients" / str(k)), *args],
            self.folder / f"client{k}.log"))

    def finish(self, timeout: float = 120):
        try:
            server = self.processes[0]
            server.wait(timeout)
            assert server.returncode == 0, (self.folder / "server.log").read_text()
            for p in self.processes[1:]:
                p.wait(30)
        finally:
            for p in self.processes:
                p.kill()
        logs = {path.stem: path.read_text() for path in self.folder.glob("*.log")}
        assert [p.returncode for p in self.processes] == [0] * len(self.processes), logs
        store = RunStore(self.folder / "run")
        try:
            models = [store.load_round(r)[0] for r in range(store.last_round() + 1)]
            return store.history(), models
        finally:
            store.close()


def moved(models, a: int, b: int) -> np.ndarray:
    """Every coordinate's change of the global model from round a to round b."""
    return np.concatenate([(models[b][k].astype(np.float64) - models[a][k]).ravel() for k in models[a]])


def failure(record, cid: str):
    [found] = [f for f in record.failures if f.client_id == cid]
    return found


def test_impossible_counts_are_rejected_and_a_huge_claim_moves_the_model_no_more_than_its_cap(tmp_path, creds):
    """Client 3 claims 10**400 examples (it crashed the server with OverflowError); client 4 sends a step of
    50 and claims 10**15 examples (it took over FedAvg). With max_examples = 10 the honest clients' +1 steps
    (10 examples each) and client 4's capped weight give (3 * 10 * 1 + 10 * 50) / 40 = 13.25 per round."""
    run = Deployment(tmp_path, creds, rounds=2, sampling="max_examples = 10")
    for k in range(3):
        run.honest(k)
    run.hostile(3, f"count={10**400}@all")
    run.hostile(4, "--step", "50", f"count={10**15}@all")
    history, models = run.finish()
    assert [r.round for r in history] == [1, 2]
    for record in history:
        assert record.participants == ["0", "1", "2", "4"]
        rejected = failure(record, "3")
        assert rejected.kind == "rejected" and "num_examples must be in [1, 2**53], got an integer of 1329 bits" \
            in rejected.reason
    np.testing.assert_allclose(moved(models, 0, 1), 13.25, atol=1e-4)
    np.testing.assert_allclose(moved(models, 1, 2), 13.25, atol=1e-4)
    assert "claims 1000000000000000 examples; its weight is capped at max_examples=10" in \
        (tmp_path / "server.log").read_text()


def test_forged_adaptive_clipping_indicators_are_rejected_and_the_clip_norm_stays_put(tmp_path, creds):
    """dp_unclipped is a 0/1 indicator (Andrew et al.); -1e4 overflowed the clip update and +20 moved the clip
    norm to 361 within three rounds. Honest clients' updates are all clipped (indicator 0), so the next clip
    norm is C * exp(-0.2 * (f - 0.5)) with f the noised fraction (count noise std 0.25 over 5 expected
    clients, so f ~ N(0, 0.05)): far within a factor exp(+-0.2) per round."""
    privacy = "[privacy]\ndp_clip = 1.0\ndp_noise = 0.3\nadaptive_clip = true"
    run = Deployment(tmp_path, creds, rounds=3, sections=privacy)
    for k in range(3):
        run.honest(k, "--central-dp")
    run.hostile(3, "--central-dp", "unclipped=-10000@all")
    run.hostile(4, "--central-dp", "unclipped=20@all")
    history, _ = run.finish()
    clip = 1.0
    for record in history:
        assert record.participants == ["0", "1", "2"]
        for cid, value in (("3", "-10000.0"), ("4", "20.0")):
            rejected = failure(record, cid)
            assert rejected.kind == "rejected" and f"'dp_unclipped' must be 0 or 1" in rejected.reason \
                and value in rejected.reason
        assert record.metrics["dp_clip"] == pytest.approx(clip)
        ratio = record.metrics["dp_clip_next"] / clip
        assert math.exp(-0.2) < ratio < math.exp(0.2), ratio
        clip = record.metrics["dp_clip_next"]


def test_bad_secure_aggregation_replies_cost_their_sender_and_aborts_cost_only_their_round(tmp_path, creds):
    """Five clients, full graph, threshold 3 of 5. Round 1: client 3 leaves c_pk out of its key
    advertisement (a KeyError that ended the run), client 4 sends num_examples="x" (a ValueError). Round 2:
    client 0 reveals corrupt shares (SecAggAbort ended the run). Round 4: three clients drop out in training,
    below the threshold. Rounds 3 and 5 are clean, and the run completes."""
    privacy = "[privacy]\nsecagg = true\nsecagg_graph = \"full\"\nsecagg_range = 1.0"
    run = Deployment(tmp_path, creds, rounds=5, sections=privacy)
    run.hostile(0, "--step", "0.5", "corrupt_shares@2")
    run.hostile(1, "--step", "0.5", "fail_training@4")
    run.hostile(2, "--step", "0.5", "fail_training@4")
    run.hostile(3, "--step", "0.5", "no_c_pk@1", "fail_training@4")
    run.hostile(4, "--step", "0.5", "count_text@1")
    history, models = run.finish(180)
    first, second, third, fourth, fifth = history
    assert first.participants == ["0", "1", "2"] and not first.note
    assert "secagg/advertise: 'c_pk' must be 32 bytes (a 1-D uint8 tensor), got nothing" in failure(first, "3").reason
    assert "secagg/masked: num_examples must be an integer, got str 'x'" in failure(first, "4").reason
    assert second.participants == [] and second.metrics["round_failed"] == 1.0
    assert "aborted by the secagg protocol" in second.note and "are corrupt" in second.note
    assert fourth.participants == [] and fourth.metrics["round_failed"] == 1.0
    assert "only 2 clients completed secagg/masked, fewer than the secure-aggregation threshold 3" in fourth.note
    assert third.participants == fifth.participants == ["0", "1", "2", "3", "4"]
    step = SecAggConfig(clip_range=1.0).quantizer(CLIENTS).step + 1e-6  # quantisation and float32 rounding
    for a, b, expected in ((0, 1, 0.5), (1, 2, 0.0), (2, 3, 0.5), (3, 4, 0.0), (4, 5, 0.5)):
        np.testing.assert_allclose(moved(models, a, b), expected, atol=step if expected else 0)
    notes = [r.note for r in history]  # the reasons are in the run store, not only in this process
    assert notes[1] and notes[3] and not notes[0] and not notes[2] and not notes[4]
