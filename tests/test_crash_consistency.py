"""A round's model and strategy state are committed together: a stateful strategy's run killed by a real
SIGKILL at its round commit (as the commit starts, and between its writes) resumes to exactly the model and
strategy state of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from crash_support import build_server
from fedlearn.server import RunStore
from transport_support import SRC, TESTS

ROUNDS, KILL_ROUND = 5, 3


@pytest.mark.parametrize("strategy, mode, committed", [
    ("scaffold", "at-commit", KILL_ROUND - 1),
    ("fedadam", "after-commit", KILL_ROUND),
])
def test_run_killed_during_a_commit_resumes_to_the_uninterrupted_result(tmp_path, strategy, mode, committed):
    straight = build_server(str(tmp_path / "straight"), strategy)
    straight.run(ROUNDS)
    straight.store.close()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, str(TESTS / "crash_support.py"), str(tmp_path / "killed"), strategy,
                            str(KILL_ROUND), mode], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    store = RunStore(tmp_path / "killed")
    assert store.last_round() == committed
    store.close()

    resumed = build_server(str(tmp_path / "killed"), strategy)
    assert resumed.round == committed
    resumed.run(ROUNDS)
    resumed.store.close()
    np.testing.assert_array_equal(resumed.params, straight.params)
    expected, got = straight.strategy.state_dict(), resumed.strategy.state_dict()
    assert sorted(got) == sorted(expected) and len(expected) >= 2
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
