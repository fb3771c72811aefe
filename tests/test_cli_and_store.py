"""CLI front door, TOML config, run directory outputs, and exact resume after a real SIGKILL."""
import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedlearn import RunStore, decode_state
from fedlearn.cli import main

QUICK = ["--num-clients", "20", "--clients-per-round", "4", "--local-epochs", "1", "--eval-clients", "2", "--quiet"]


def test_simulate_writes_a_complete_run_directory(tmp_path, capsys):
    assert main(["simulate", "--rounds", "3", "--run-dir", str(tmp_path), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out and str(tmp_path) in out
    for name in ("run.sqlite", "final_model.flt", "metrics.csv", "metrics.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,seconds,") and "test_accuracy" in rows[0] and len(rows) == 4
    assert all(float(row.split(",")[1]) > 0 for row in rows[1:])  # each round's wall time
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = decode_state((tmp_path / "final_model.flt").read_bytes())
    assert list(state)[0].endswith("weight")


def test_toml_config_is_read_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('seed = 4\nrounds = 2\n[data]\ndataset = "breast_cancer"\npartition = "iid"\nnum_clients = 8\n'
                   '[sampling]\nfraction = 0.5\neval_clients = 0\n[strategy]\nname = "fedprox"\nmu = 0.5\n'
                   '[client]\nlocal_epochs = 1\n')
    assert main(["simulate", "--config", str(cfg), "--rounds", "1", "--run-dir", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "breast_cancer, 8 clients (iid), fedprox, 1 rounds, seed 4" in out


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "-1"], "alpha must be > 0"),
    (["--dataset", "cifar"], "dataset must be one of"),
    (["--strategy", "fedprox", "-p", "nu=1"], "strategy 'fedprox' has no parameter 'nu'"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--clients-per-round", "500"], "cannot sample 500 clients"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    (["--resume", "/nonexistent-run"], "/nonexistent-run does not exist"),
])
def test_bad_values_give_one_clear_line(argv, message, capsys):
    assert main(["simulate", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlearn: error:") and message in err and "\n" not in err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--resume", "--partition", "--strategy", "--crash-rate", "--straggler-rate"):
        assert flag in out


def _last_round(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT MAX(round) FROM rounds").fetchone()[0] or 0
    except sqlite3.OperationalError:
        return 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlearn.cli", "simulate", *args]


def test_killed_run_resumes_to_the_same_final_model(tmp_path):
    args = ["--rounds", "10", "--num-clients", "40", "--clients-per-round", "20", "--local-epochs", "4",
            "--crash-rate", "0.1", "--straggler-rate", "0.2", "--quiet", "--seed", "11"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(*args, "--run-dir", str(full)), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(*args, "--run-dir", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _last_round(killed / "run.sqlite") < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = _last_round(killed / "run.sqlite")
    assert 3 <= stopped_at < 10, f"the run was not killed mid-way (last committed round {stopped_at})"
    assert not (killed / "final_model.flt").exists()

    done = subprocess.run(_cli("--resume", str(killed), "--quiet"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _last_round(killed / "run.sqlite") == 10
    a = decode_state((full / "final_model.flt").read_bytes())
    b = decode_state((killed / "final_model.flt").read_bytes())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _without_seconds(full / "metrics.csv") == _without_seconds(killed / "metrics.csv")


def _without_seconds(path: Path) -> list[list[str]]:
    """The metrics CSV without its wall-time column (which differs between two runs of the same rounds)."""
    return [row[:1] + row[2:] for row in csv.reader(path.read_text().splitlines())]


def test_report_summarizes_a_run_and_compares_two_side_by_side(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["simulate", "--rounds", "2", "--run-dir", str(a), *QUICK]) == 0
    assert main(["simulate", "--rounds", "3", "--run-dir", str(b), "--crash-rate", "0.5", *QUICK]) == 0
    capsys.readouterr()
    assert main(["report", str(a)]) == 0
    single = capsys.readouterr().out
    store = RunStore(a)
    history = store.history()
    store.close()
    accuracies = [r.metrics["test_accuracy"] for r in history]
    best_round = int(np.argmax(accuracies)) + 1
    assert next(line for line in single.splitlines() if line.startswith("final test_accuracy ")).split()[-1] == \
        f"{accuracies[-1]:.4f}"
    assert f"{max(accuracies):.4f} (round {best_round})" in single
    assert next(line for line in single.splitlines() if line.startswith("rounds ")).split()[1:] == ["2", "of", "2"]
    assert main(["report", str(a), str(b)]) == 0
    both = capsys.readouterr().out.splitlines()
    failures = next(line for line in both if line.startswith("failures"))
    crashes = sum(f.kind == "crash" for r in RunStore(b).history() for f in r.failures)
    assert failures.split()[1] == "none" and f"crash {crashes}" in failures and crashes > 0
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
