"""FedBuff from the front doors: `fedlearn simulate --async ...` and the [async] TOML section, exact resume of
an asynchronous run through `--resume`, the report and dashboard in server steps, and settings refused by name."""
from __future__ import annotations

import numpy as np
import pytest

from fedlearn import RunStore
from fedlearn.cli import main
from fedlearn.config import ConfigError, SimulationConfig, load_toml
from fedlearn.dashboard import RunSnapshots
from fedlearn.serialize import decode_state
from fedlearn.server.async_loop import DRIVER_STATE
from fedlearn.simulate import FINAL_MODEL, simulate

TASK = {"dataset": "digits", "num_clients": 12, "model": "logreg", "local_epochs": 1, "eval_clients": 0, "seed": 3}
ASYNC = {"buffer_size": 3, "concurrency": 5, "max_staleness": 4, "staleness": "poly", "staleness_exponent": 1.0,
         "speed_sigma": 1.0, "mean_online": 20.0, "mean_offline": 5.0}
FLAGS = ["--dataset", "digits", "--num-clients", "12", "--model", "logreg", "--local-epochs", "1", "--eval-clients",
         "0", "--seed", "3", "--buffer-size", "3", "--concurrency", "5", "--max-staleness", "4", "--staleness", "poly",
         "--staleness-exponent", "1", "--speed-sigma", "1", "--mean-online", "20", "--mean-offline", "5", "--quiet"]


def _final(run_dir):
    return decode_state((run_dir / FINAL_MODEL).read_bytes())


def test_cli_async_run_resumes_exactly_and_reports_server_steps(tmp_path, capsys):
    whole = simulate({**TASK, "rounds": 6, "asynchronous": ASYNC}, run_dir=tmp_path / "whole")
    assert main(["simulate", *FLAGS, "--rounds", "3", "--run-dir", str(tmp_path / "split")]) == 0
    assert "FedBuff 3 server steps of 3 results, 5 clients at once" in capsys.readouterr().out
    assert main(["simulate", "--resume", str(tmp_path / "split"), "--rounds", "6", "--quiet"]) == 0
    resumed = _final(tmp_path / "split")
    for name, value in whole.final_state.items():
        np.testing.assert_array_equal(resumed[name], value)
    store = RunStore(tmp_path / "split", readonly=True)
    try:
        history = store.history()
        assert store.get_meta(DRIVER_STATE)["executor"]["now"] == whole.history.rounds[-1].metrics["clock"]
    finally:
        store.close()
    assert [r.participants for r in history] == [r.participants for r in whole.history.rounds]
    assert all(r.metrics["clients_used"] == 3 for r in history)  # K results per server step
    assert any(r.metrics["staleness_max"] > 0 for r in history)
    assert main(["report", str(tmp_path / "split")]) == 0
    report = capsys.readouterr().out
    assert any(line.split() == ["steps", "6", "of", "6"] for line in report.splitlines())
    assert "asynchronous (FedBuff): K = 3 results per server step, 5 clients at once, staleness poly, max 4" in report
    stale = max(r.metrics["staleness_max"] for r in history)
    assert f"max {stale:.0f}" in report and "rounds failed" not in report
    snapshot = RunSnapshots(tmp_path / "split")()
    assert snapshot["unit"] == "step" and snapshot["asynchronous"]["buffer_size"] == 3


def test_async_toml_section_is_the_same_as_the_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('rounds = 6\n[async]\nbuffer_size = 3\nconcurrency = 5\nmax_staleness = 4\nstaleness = "poly"\n'
                      'staleness_exponent = 1.0\nspeed_sigma = 1.0\nmean_online = 20.0\nmean_offline = 5.0\n')
    assert load_toml(config)["asynchronous"] == ASYNC
    cfg = SimulationConfig.from_dict({**TASK, **load_toml(config)}).async_config()
    assert cfg.settings().staleness == "polynomial" and cfg.fleet(seed=3).mean_offline == 5.0
    assert cfg.fleet(seed=3).seed == 3


@pytest.mark.parametrize("settings, message", [
    ({"asynchronous": {"buffer_size": 0}}, r"\[async\] buffer_size must be >= 1, got 0"),
    ({"asynchronous": {"max_staleness": -2}}, r"\[async\] max_staleness must be >= 0"),
    ({"asynchronous": {"staleness": "linear"}}, r'\[async\] staleness must be "sqrt", "poly" or "constant"'),
    ({"asynchronous": {"mean_offline": float("nan")}}, r"\[async\] mean_offline must be >= 0, got nan"),
    ({"asynchronous": {"concurency": 5}}, r"\[async\] unknown setting 'concurency' \(did you mean concurrency"),
    ({"asynchronous": {"concurrency": "5"}}, r"\[async\] concurrency must be a whole number"),
    ({"asynchronous": {"buffer_size": 2}, "privacy": {"dp_clip": 1.0, "dp_noise": 1.0}}, r"\[async\] cannot be "
                                                                                         r"combined with \[privacy\]"),
    ({"asynchronous": {"buffer_size": 2}, "eval_clients": 4}, r"eval_clients: federated evaluation does not run"),
    ({"asynchronous": {"buffer_size": 2}, "compression": {"uplink": {"method": "qsgd", "bits": 2}}},
     r"\[async\] cannot be combined with \[compression\] yet"),
])
def test_bad_async_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig.from_dict(settings)


def test_a_deployment_refuses_the_simulated_fleet():
    from fedlearn.asynchronous import AsyncConfig

    with pytest.raises(ConfigError, match=r"\[async\] mean_offline, speed_sigma: the virtual fleet is simulation-only"):
        AsyncConfig.for_deployment({"buffer_size": 2, "speed_sigma": 1.0, "mean_offline": 3.0})
    assert AsyncConfig.for_deployment({"buffer_size": 2, "staleness": "constant"}).settings().buffer_size == 2


def test_cli_flag_error_names_the_setting(capsys):
    assert main(["simulate", "--async", "--concurrency", "0", "--quiet"]) == 2
    assert "[async] concurrency must be >= 1, got 0" in capsys.readouterr().err
