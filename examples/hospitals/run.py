"""Four hospitals, end to end on this machine: credentials, a `fedlearn server` serving the app in
hospitals.py with secure aggregation and distributed DP (server.toml), and four `fedlearn client`
processes, one per hospital, over gRPC with mutual TLS on 127.0.0.1.

    python examples/hospitals/run.py                  # the rounds of server.toml (10)
    python examples/hospitals/run.py --rounds 2       # a quick try

Every process it starts is stopped when it ends, also when a process fails or the script is interrupted.
It prints the final scores, `fedlearn report` and `fedlearn audit verify` of the run directory, and writes
them to WORK/result.json. Needs the UCI files (../shared/data/heart_disease, or --data DIR).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlearn.cli import main as fedlearn_cli  # certs, report and audit run in this process

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hospitals import DATA, HOSPITALS  # noqa: E402  (the task's module, beside this script)

SCORES = ("fed_accuracy", "fed_auc", "fed_balanced_accuracy", "dp_epsilon", "clients_used")


def fedlearn(*args: str) -> list[str]:
    """The `fedlearn` command run by this Python (so it works from a checkout as well as an install)."""
    return [sys.executable, "-m", "fedlearn.cli", *args]


def fedlearn_here(*args: str) -> tuple[int, str]:
    """`fedlearn ARGS` run in this process: its exit code and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fedlearn_cli(list(args))
    return code, out.getvalue()


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_port(server: subprocess.Popen, log: Path, timeout: float) -> int:
    """The port the server prints once it listens (it was started on port 0: any free port)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = re.search(r"listening on port (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before listening; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"the server did not listen within {timeout:.0f}s; see {log}")


def wait_for_server(server: subprocess.Popen, clients: dict[str, subprocess.Popen], timeout: float) -> None:
    """Until the server exits; a client that fails first, or the time running out, stops the run."""
    end = time.monotonic() + timeout
    while server.poll() is None:
        for name, client in clients.items():
            if client.poll() not in (None, 0):
                raise RuntimeError(f"hospital {name} exited with code {client.returncode} during the run")
        if time.monotonic() > end:
            raise RuntimeError(f"the run did not finish within {timeout:.0f}s")
        time.sleep(0.2)
    if server.returncode != 0:
        raise RuntimeError(f"the server exited with code {server.returncode}")


def stop(processes: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Terminate every process still running, then kill those that do not stop within `grace` seconds."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def last_row(run_dir: Path) -> dict[str, float]:
    """The last round's scores from the run's metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"rounds": len(rows), **{k: float(rows[-1][k]) for k in SCORES if k in rows[-1]}}


def deploy(work: Path, data: Path, rounds: int | None, timeout: float) -> dict:
    """Credentials, server, four hospitals; returns the final scores and the audit check."""
    shutil.copy(HERE / "server.toml", work / "server.toml")
    code, _ = fedlearn_here("certs", "--out", str(work / "certs"), *[a for h in HOSPITALS for a in ("--client", h)])
    if code != 0:
        raise RuntimeError("fedlearn certs failed")
    processes: list[subprocess.Popen] = []
    try:
        server_log = work / "server.log"
        server = start(fedlearn("server", "--config", str(work / "server.toml"), "--app-dir", str(HERE),
                                "--address", "127.0.0.1:0", "--quiet",
                                *(["--rounds", str(rounds)] if rounds else [])), server_log)
        processes.append(server)
        port = wait_for_port(server, server_log, 120)
        print(f"server listening on 127.0.0.1:{port}; starting {len(HOSPITALS)} hospitals", flush=True)
        clients = {}
        for name in HOSPITALS:
            clients[name] = start(fedlearn(
                "client", "--server", f"127.0.0.1:{port}", "--credentials", str(work / "certs" / "clients" / name),
                "--client-module", "hospitals:make_client", "--app-dir", str(HERE), "--client-arg", f"data={data}",
                "--central-dp",                                          # clip to the norm the server sends
                "--peer-keys", str(work / "certs" / "allowlist.txt"),    # trust only these keys for SecAgg
                "--secagg-min-cohort", str(len(HOSPITALS)), "--retry-for", "60"), work / f"{name}.log")
            processes.append(clients[name])
        wait_for_server(server, clients, timeout)
        for name, client in clients.items():  # the server has told them the run is over
            if client.wait(30) != 0:
                raise RuntimeError(f"hospital {name} exited with code {client.returncode}; see {work / f'{name}.log'}")
    finally:
        stop(processes)
    run_dir = work / "run"
    result = last_row(run_dir)
    _, report = fedlearn_here("report", str(run_dir))
    audit, verdict = fedlearn_here("audit", "verify", str(run_dir))
    print(report + verdict, end="")
    result["audit_ok"] = audit == 0
    result["secagg_stages"] = sum(len(re.findall(r"kind=exchange", (work / f"{h}.log").read_text())) for h in HOSPITALS)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="rounds to run (default: server.toml's)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"folder with processed.*.data (default {DATA})")
    parser.add_argument("--work", type=Path, help="new folder for credentials, logs and the run (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the whole run may take")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="hospitals-"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "run").exists():
        parser.error(f"{work} already holds a run; give a new --work folder")
    print(f"work folder: {work}", flush=True)
    try:
        result = deploy(work, args.data, args.rounds, args.timeout)
    except RuntimeError as exc:
        print(f"failed: {exc}; logs in {work}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; every process this script started is stopped; logs in {work}", file=sys.stderr)
        return 130
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print("result: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0 if result["audit_ok"] else 1


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that `kill` of this script stops its processes too (the finally in deploy)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    sys.exit(main())
