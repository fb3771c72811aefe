"""The dashboard: its JSON snapshot of a run pinned to the run store, the operator token, and the page in
a real browser (headless Debian Chromium through Playwright) during a running simulation: a round appears,
then a later one without reloading, and a flagged client shows with its reason. Screenshots go to
$FEDLEARN_ARTIFACTS (default tmp/artifacts in the repository)."""
from __future__ import annotations

import json
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedlearn import simulate
from fedlearn.dashboard import Dashboard, RunSnapshots, authorized
from fedlearn.server.store import RunStore

CHROMIUM = os.environ.get("FEDLEARN_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FEDLEARN_ARTIFACTS", Path(__file__).resolve().parent.parent / "tmp" / "artifacts"))
ATTACKED = ["--num-clients", "12", "--clients-per-round", "8", "--local-epochs", "1", "--eval-clients", "0",
            "--attack", "sign_flip", "--attack-fraction", "0.25", "--attack-param", "scale=20", "--quiet"]


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dash") / "run"
    simulate({"num_clients": 12, "clients_per_round": 8, "rounds": 4, "local_epochs": 1, "eval_clients": 0,
              "attack": "sign_flip", "attack_fraction": 0.25, "attack_params": {"scale": 20.0},
              "contributions": {"methods": ["gtg"]}}, run_dir=run_dir)
    return run_dir


def test_snapshot_matches_the_run_store(finished: Path) -> None:
    state = RunSnapshots(finished)()
    store = RunStore(finished, readonly=True)
    history, ledger = store.history(), store.contribution_ledger()
    store.close()
    assert [r["round"] for r in state["rounds"]] == [r.round for r in history]
    assert [r["metrics"]["test_accuracy"] for r in state["rounds"]] == [r.metrics["test_accuracy"] for r in history]
    flagged = [(r.round, f.client_id, f.reason) for r in history for f in r.failures if f.kind == "flagged"]
    assert flagged and state["flagged_total"] == len(flagged)
    assert {(f["round"], f["client"], f["reason"]) for f in state["failures"] if f["kind"] == "flagged"} == set(flagged)
    assert all(r["seconds"] is not None and r["seconds"] >= 0 for r in state["rounds"])
    assert {row["client"]: row["gtg"]["total"] for row in state["contributions"]} == pytest.approx(
        {cid: m["gtg"][0] for cid, m in ledger.items()})
    assert state["audit"]["ok"] and state["audit"]["size"] == len(history) + 1


def test_snapshot_reports_a_tampered_log(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    with sqlite3.connect(copy / "run.sqlite") as conn:
        conn.execute("DELETE FROM audit_leaves WHERE idx = 1")
    audit = RunSnapshots(copy)()["audit"]
    assert not audit["ok"] and audit["problems"]


def test_server_serves_assets_and_requires_the_token(finished: Path) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()  # the server holds only the token's digest
    assert authorized(None, None) and authorized("Bearer s3cret", digest)
    assert not authorized(None, digest) and not authorized("Bearer wrong", digest) and not authorized("s3cret", digest)
    assert not authorized(f"Bearer {digest}", digest)  # the digest itself is no token
    dashboard = Dashboard(RunSnapshots(finished), token_digest=digest)
    port = dashboard.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert dashboard._httpd.server_address[0] == "127.0.0.1"
        status, page = get(base + "/")
        assert status == 200 and b"/app.js" in page and b"http" not in page.replace(b'http-equiv', b'')
        assert get(base + "/app.js")[0] == 200 and get(base + "/style.css")[0] == 200
        assert get(base + "/api/state")[0] == 401
        assert get(base + "/api/state", "wrong")[0] == 401
        status, body = get(base + "/api/state", "s3cret")
        assert status == 200 and json.loads(body)["audit"]["ok"]
        assert get(base + "/../run.sqlite")[0] == 404
        assert get(base + "/metrics")[0] == 401
        status, text = get(base + "/metrics", "s3cret")
        metrics = dict(line.split() for line in text.decode().splitlines())
        assert status == 200 and metrics["fedlearn_round"] == "4" and metrics["fedlearn_audit_log_verified"] == "1"
        assert int(metrics["fedlearn_flagged_total"]) == json.loads(body)["flagged_total"] > 0
    finally:
        dashboard.stop()


def test_cli_dashboard_serves_a_finished_run(finished: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fedlearn.cli", "dashboard", str(finished), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, body = get(f"http://127.0.0.1:{port}/api/state")
        assert status == 200 and len(json.loads(body)["rounds"]) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install it (apt-get install -y chromium) or set FEDLEARN_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    return sync_api


def test_browser_shows_a_running_simulation(tmp_path: Path) -> None:
    sync_api = _browser()
    run_dir = tmp_path / "live"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sim = subprocess.Popen([sys.executable, "-m", "fedlearn.cli", "simulate", *ATTACKED, "--rounds", "200",
                            "--run-dir", str(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dashboard = Dashboard(RunSnapshots(run_dir))
    port = dashboard.start()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/?poll=300")
                round_card = page.locator("#card-round .value")
                sync_api.expect(round_card).not_to_have_text("0", timeout=60_000)
                first = int(round_card.inner_text().split("/")[0])
                sync_api.expect(page.locator("#status")).to_have_text("live")
                flagged = page.locator("#failures tbody tr", has=page.locator(".kind-flagged")).first
                sync_api.expect(flagged).to_be_visible(timeout=60_000)
                cells = flagged.locator("td").all_inner_texts()
                assert cells[2] == "flagged" and "outlier" in cells[3], cells
                sync_api.expect(round_card).not_to_have_text(f"{first} / 200", timeout=60_000)  # live update
                assert int(round_card.inner_text().split("/")[0]) > first
                assert sim.poll() is None, "the simulation ended before the page was checked live"
                assert "✓" in page.locator("#card-audit .value").inner_text()
                sync_api.expect(page.locator("#chart-accuracy svg polyline")).to_have_count(1)
                page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)
            finally:
                browser.close()
    finally:
        dashboard.stop()
        sim.send_signal(signal.SIGKILL)
        sim.wait()
