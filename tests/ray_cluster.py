"""A throwaway Ray cluster on this machine, started the way the README tells users: `ray start --head`, then
`ray start --address HEAD:PORT` for each further node, with token authentication on.

Everything is private to one cluster, so it cannot meet another Ray on a shared machine: a fresh random token
(passed in `RAY_AUTH_TOKEN`, never written to ~/.ray), its own temp dir per node, free ports for every
server Ray would otherwise open on a default port, and no dashboard. Each node is one `ray start --block`
process in a session of its own, so all its Ray processes share one process group: `kill_node` and `stop`
signal exactly those groups, and then anything still running with this cluster's temp dir on its command line.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transport_support import free_port

RAY = Path(sys.executable).with_name("ray")


class LocalRayCluster:
    """Nodes of one Ray cluster on 127.0.0.1; `env` is what a driver needs to join it (auth mode, token and
    `RAY_ADDRESS`, so `--ray-address auto` finds this cluster and no other)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.token = secrets.token_hex(32)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_port = free_port()  # Ray Client: ray://127.0.0.1:client_port
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0",
                    # a killed node (refusing connections) is declared dead after about five seconds, not
                    # fifteen; a busy one still has three seconds per check to answer
                    "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_timeout_ms": "3000", "RAY_health_check_failure_threshold": "5"}
        self.nodes: list[subprocess.Popen] = []

    def start_head(self, num_cpus: int) -> None:
        self._start(["--head", f"--port={self.port}", f"--ray-client-server-port={self.client_port}",
                     "--include-dashboard=false", f"--dashboard-port={free_port()}"], num_cpus)

    def add_node(self, num_cpus: int) -> None:
        self._start([f"--address={self.address}"], num_cpus)

    def _start(self, role: list[str], num_cpus: int) -> None:
        k = len(self.nodes)
        ports = [f"--{name}-port={free_port()}" for name in
                 ("node-manager", "object-manager", "metrics-export", "dashboard-agent-listen", "dashboard-agent-grpc",
                  "runtime-env-agent")]
        log = self.root / f"node{k}.log"
        with open(log, "w") as out:
            node = subprocess.Popen(
                [str(RAY), "start", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                 f"--temp-dir={self.root}/n{k}", "--object-store-memory=80000000", "--disable-usage-stats",
                 "--block", *ports], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in log.read_text():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {k} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill_node(self, k: int) -> None:
        """SIGKILL every process of node `k` at once, as a machine losing power would."""
        _signal_group(self.nodes[k], signal.SIGKILL)
        self.nodes[k].wait()

    def stop(self) -> None:
        for node in self.nodes:
            _signal_group(node, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for node in self.nodes:
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node, signal.SIGKILL)
            node.wait()
        for pid in self.stragglers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def stragglers(self) -> list[int]:
        """Processes still alive that name this cluster's temp dir on their command line."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()):
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.root).encode() in cmdline:
                    found.append(int(entry.name))
        return found


def _signal_group(node: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(node.pid, sig)  # the node's session leader: its pid is the group id
    except ProcessLookupError:
        pass
