"""The audit log of an asynchronous (FedBuff) run: each server step is one record naming every update it took
(a fast client twice), `fedlearn audit verify` passes on the run store and catches an edited step, and the
dashboard and the contribution report handle a store of steps."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from argparse import Namespace
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedlearn import Client, FedAvg, InProcessPool, RunStore, Update
from fedlearn.audit.verify import verify_run
from fedlearn.cli import main
from fedlearn.config import ConfigError
from fedlearn.dashboard.snapshot import RunSnapshots
from fedlearn.run_commands import report_contributions
from fedlearn.server.async_loop import AsyncServer
from fedlearn.simulation.clock import Fleet, VirtualClock
from fedlearn.simulation.clocked import VirtualExecutor

VALUES = {"a": 0.3, "b": -2.0}


class ConstantClient(Client):
    def __init__(self, cid: str) -> None:
        super().__init__(cid)

    def fit(self, state, config) -> Update:
        return Update(self.cid, config["round"], np.full(3, VALUES[self.cid]), 1, {"train_loss": 0.0})


def sha(value: float) -> str:
    """The hash of a constant client's update, computed here: SHA-256 of three little-endian float64s."""
    return hashlib.sha256(np.full(3, value, dtype="<f8").tobytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a finishes every 1s, b every 2.5s, K = 2: step 1 takes a twice, step 2 b (stale) and a, step 3 a and b
    run_dir = tmp_path_factory.mktemp("fedbuff") / "run"
    store = RunStore(run_dir)
    clock = VirtualClock(Fleet(jitter_sigma=0.0, speeds={"a": 1.0, "b": 2.5}))
    server = AsyncServer(VirtualExecutor(InProcessPool(ConstantClient, list(VALUES)), clock), FedAvg(),
                         OrderedDict(w=np.zeros(3)), buffer_size=2, concurrency=2, store=store)
    history = server.run(3)
    store.close()
    assert [r.participants for r in history.rounds] == [["a", "a"], ["b", "a"], ["a", "b"]]
    return run_dir


def records(run_dir: Path) -> list[dict]:
    conn = sqlite3.connect(run_dir / "run.sqlite")
    rows = conn.execute("SELECT record FROM audit_leaves ORDER BY idx").fetchall()
    conn.close()
    return [json.loads(r[0]) for r in rows]


def edit(run_dir: Path, statement: str, args: tuple) -> None:
    conn = sqlite3.connect(run_dir / "run.sqlite")
    with conn:
        conn.execute(statement, args)
    conn.close()


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


def test_each_async_step_is_one_record_naming_every_update_it_took(run: Path) -> None:
    recs = records(run)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    # hashes of the updates as received (before the staleness weight), a's two in step 1 in the order taken
    assert [r["accepted"] for r in recs[1:]] == [{"a": f"{sha(0.3)},{sha(0.3)}"},
                                                 {"a": sha(0.3), "b": sha(-2.0)}, {"a": sha(0.3), "b": sha(-2.0)}]
    assert all(r["model_before"] == p["model_after"] for p, r in zip(recs, recs[1:]))
    result = verify_run(run)
    assert result.ok and result.size == 4, result.problems
    assert main(["audit", "verify", str(run)]) == 0


def test_an_edited_async_step_is_detected(copy: Path) -> None:
    recs = records(copy)
    step = recs[1]
    step["accepted"]["a"] = sha(0.3)  # the server claims it took a's update once, not twice
    edit(copy, "UPDATE audit_leaves SET record = ? WHERE idx = 1",
         (json.dumps(step, sort_keys=True, separators=(",", ":")).encode(),))
    problems = verify_run(copy).problems
    assert any("participants stored for round 1 differ" in p for p in problems), problems
    assert any("stored head" in p and "not extended" in p for p in problems), problems  # and the leaf changed
    assert main(["audit", "verify", str(copy)]) == 1


def test_a_step_whose_participants_were_edited_is_detected(copy: Path) -> None:
    edit(copy, "UPDATE rounds SET participants = ? WHERE round = 2", (json.dumps(["b", "b"]),))
    assert any("participants stored for round 2 differ" in p for p in verify_run(copy).problems)


def test_a_truncated_async_log_is_detected(copy: Path) -> None:
    edit(copy, "DELETE FROM audit_leaves WHERE idx = ?", (3,))
    edit(copy, "DELETE FROM audit_heads WHERE size = ?", (4,))
    problems = verify_run(copy).problems
    assert any("round 3 is committed in the store but has no audit record" in p for p in problems), problems


def test_dashboard_shows_steps_and_the_contribution_report_says_why_it_has_none(run: Path) -> None:
    snapshot = RunSnapshots(run)()
    assert snapshot["mode"] == "asynchronous" and [r["round"] for r in snapshot["rounds"]] == [1, 2, 3]
    assert [r["participants"] for r in snapshot["rounds"]] == [2, 2, 2]
    assert snapshot["rounds"][1]["metrics"]["staleness_max"] == 1.0  # b's update was one step stale
    assert snapshot["audit"]["ok"] and snapshot["audit"]["size"] == 4
    assert "asynchronous" in snapshot["contributions_note"] and snapshot["contributions"] == []
    with pytest.raises(ConfigError, match="asynchronous .*keeps no contribution scores"):
        report_contributions(Namespace(method="gtg", budget=100.0, out=None), run)
