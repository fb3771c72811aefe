"""A server process: the `Server` round loop over a `RemotePool`, served over gRPC, committing each round to
the run store so that a server killed at any moment resumes from its last committed round when restarted on
the same run directory (with the same run id, so reconnecting clients carry on).

`DeploymentServer` is the Python API for any model; `serve_app` runs an app (or a built-in task, which is
an app too) with the run settings of server.toml.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..app import App
from ..asynchronous import AsyncConfig
from ..audit.receipts import ReceiptIssuer
from ..config import ConfigError, SimulationConfig, load_toml
from ..dashboard import Dashboard, RunSnapshots
from ..metrics import MetricAggregation, weighted_mean_metrics
from ..params import Layout
from ..compression import Compression
from ..compression.settings import CompressionSettings
from ..privacy import PrivacyConfig, PrivacySetup, build_privacy
from ..progress import RoundProgress
from ..server import ClientSampler, RunStore, Server
from ..server.anomaly import AnomalyChecks
from ..server.async_loop import AsyncServer, AsyncSettings
from ..server.protocol import RoundProtocol
from ..server.round_loop import CentralEval
from ..server.sampling import PoissonSampler
from ..server.store import RoundRecord
from ..simulate import SimulationResult, task_app, write_outputs
from ..simulation.robustness import robustness_setup
from ..strategies import Strategy
from ..transforms.base import Transform
from ..types import Config, State
from . import fedlearn_pb2 as pb
from .audit_rpc import AuditAnswers
from .async_tasks import RemoteExecutor
from .channels import ServerTLS, start_server
from .identity import AllowList
from .remote_pool import RemotePool
from .service import Service

log = logging.getLogger(__name__)

AUDIT_SENT = "audit_heads_sent"  # run-store meta key: client id -> size of the audit head its last task carried
_PATHS = ("run_dir", "certificate", "private_key", "client_ca", "allow_list", "audit_key", "operator_token")


@dataclass
class ServerSettings:
    """The [server] section of server.toml: where to listen, how to secure it, how long to wait.

    Relative paths are relative to the config file's folder. `client_ca` turns on mutual TLS.
    `wait_for_clients` = 0 waits for as many clients as a round samples (1 when sampling a fraction); once
    `min_clients` are connected a round waits at most `proceed_after` seconds for the rest, then goes on with
    the clients it has. `wait_timeout` is how long it waits for `min_clients` before giving up.
    `max_connections` authenticated clients are served at once; `max_unauthenticated` connections (at most
    `max_unauthenticated_per_peer` from one address) may take up to `handshake_timeout` seconds to
    authenticate. `operator_token` holds the SHA-256 of the token `fedlearn status --token` shows.
    `audit_key` is the Ed25519 key (PEM) that signs the audit log's tree heads (default: one made in the run
    directory). `dashboard` = "127.0.0.1:PORT" serves the operator's live dashboard there, behind the same
    operator token.
    """

    address: str = "0.0.0.0:8443"
    run_dir: str = "runs/server"
    certificate: str = "certs/server.pem"
    private_key: str = "certs/server.key"
    client_ca: str = ""
    allow_list: str = "certs/allowlist.txt"
    insecure: bool = False
    round_deadline: float = 120.0
    wait_for_clients: int = 0
    wait_timeout: float = 600.0
    proceed_after: float = 30.0
    max_connections: int = 256
    max_unauthenticated: int = 64
    max_unauthenticated_per_peer: int = 8
    handshake_timeout: float = 10.0
    operator_token: str = "certs/operator.token.sha256"
    audit_key: str = ""
    dashboard: str = ""

    def __post_init__(self) -> None:
        for name in ("round_deadline", "wait_timeout", "handshake_timeout", "proceed_after"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[server] {name} must be > 0, got {getattr(self, name)}")
        if self.wait_for_clients < 0 or min(self.max_connections, self.max_unauthenticated,
                                            self.max_unauthenticated_per_peer) < 1:
            raise ConfigError("[server] wait_for_clients must be >= 0, and max_connections, max_unauthenticated "
                              "and max_unauthenticated_per_peer >= 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: Path = Path(".")) -> "ServerSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown [server] setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        resolved = {k: str(base_dir / v) if k in _PATHS and v and not Path(v).is_absolute() else v
                    for k, v in values.items()}
        try:
            return cls(**resolved)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def tls(self) -> ServerTLS | None:
        if self.insecure:
            return None
        return ServerTLS(Path(self.certificate), Path(self.private_key), Path(self.client_ca) if self.client_ca else None)


def load_server_config(path: str | Path) -> tuple[SimulationConfig, ServerSettings]:
    """Read server.toml: the task (same sections as a simulation config) and the [server] section."""
    flat = load_toml(path, extra_sections=("server",))
    settings = ServerSettings.from_dict(flat.pop("server", {}), Path(path).parent)
    return SimulationConfig.from_dict(flat), settings


class DeploymentServer:
    """Serves a federated run to remote clients: `start()` listens, `run()` runs the rounds, `stop()` ends.

    The run directory belongs to `run_config` (default: `Server.describe()` and `rounds`): another
    configuration is refused, and `resume` may raise only `rounds`. The other arguments are those of `Server`
    (`max_examples` caps the example count, the aggregation weight, a client may claim; None: no cap); with
    `asynchronous` settings the run is FedBuff (`AsyncServer`, `rounds` server steps) over the connected
    clients, which may join and leave at any time. A multi-exchange `protocol` (secure aggregation) runs its stages
    through the pool, and each client process needs the protocol's `client_handlers()` (`run_client`; for
    secure aggregation `secagg_handlers`). `sampler` replaces the count / fraction sampler.
    """

    def __init__(
        self,
        initial_state: State,
        strategy: Strategy,
        *,
        rounds: int,
        settings: ServerSettings,
        clients_per_round: int | None = None,
        fraction: float | None = None,
        min_clients: int = 1,
        eval_clients: int = 0,
        max_examples: int | None = None,
        central_eval: CentralEval | None = None,
        transforms: Sequence[Transform] = (),
        anomaly_checks: AnomalyChecks | None = AnomalyChecks(),
        protocol: RoundProtocol | None = None,
        sampler: ClientSampler | PoissonSampler | None = None,
        fit_config: Config | None = None,
        evaluate_metrics: MetricAggregation = weighted_mean_metrics,
        seed: int = 0,
        run_config: dict[str, Any] | None = None,
        resume: bool = False,
        asynchronous: AsyncSettings | None = None,
        downlink: Compression | None = None,
    ) -> None:
        if clients_per_round is None and fraction is None:
            fraction = 1.0
        AllowList.load(settings.allow_list)  # fail now, not at the first connection
        self.settings, self.rounds = settings, rounds
        self.store = RunStore(settings.run_dir, audit_key=settings.audit_key or None)
        self.run_id = self.store.get_meta("run_id") or uuid.uuid4().hex
        # an asynchronous client's tasks span many audit records: the heads sent to each are kept in the store
        receipts = ReceiptIssuer(self.store.audit) if asynchronous is None else ReceiptIssuer(
            self.store.audit, self.store.get_meta(AUDIT_SENT), lambda sent: self.store.set_meta(AUDIT_SENT, sent))
        self.pool = RemotePool(self.run_id, round_deadline=settings.round_deadline,
                               min_available=settings.wait_for_clients or clients_per_round or 1,
                               min_clients=min_clients, proceed_after=settings.proceed_after,
                               wait_timeout=settings.wait_timeout, fit_config=fit_config,
                               receipts=receipts, downlink=downlink)
        if asynchronous is not None:  # FedBuff: `rounds` counts server steps, clients come and go at will
            if protocol is not None or sampler is not None:
                self.store.close()
                raise ConfigError("asynchronous mode takes no round protocol (secure aggregation) or sampler: "
                                  "clients train whenever they are connected and idle")
            config = run_config or {"asynchronous": asdict(asynchronous), "strategy": type(strategy).__qualname__,
                                    "max_examples": max_examples, "rounds": rounds}
        else:
            self.server: Server | AsyncServer = Server(
                self.pool, strategy, initial_state, sampler=sampler or ClientSampler(clients_per_round, fraction, seed=seed),
                min_clients=min_clients, max_examples=max_examples, transforms=transforms, central_eval=central_eval,
                eval_clients=eval_clients, seed=seed, anomaly_checks=anomaly_checks, protocol=protocol,
                evaluate_metrics=evaluate_metrics)
            config = run_config or {**self.server.describe(), "rounds": rounds}
        try:
            self.store.bind_config(config, resume=resume)
        except ValueError:
            self.store.close()
            raise
        self.store.set_meta("run_id", self.run_id)
        self.store.set_meta("server", asdict(settings))
        if asynchronous is not None:
            self.server = AsyncServer(
                RemoteExecutor(self.pool), strategy, initial_state, **asynchronous.server_args(),
                transforms=transforms, anomaly_checks=anomaly_checks, central_eval=central_eval, store=self.store,
                seed=seed, max_examples=max_examples, eval_clients=eval_clients, evaluate_metrics=evaluate_metrics)
        else:
            self.server.attach(self.store)
        self.service = Service(self.pool, settings.allow_list, self.status, handshake_timeout=settings.handshake_timeout,
                               max_clients=settings.max_connections, max_unauthenticated=settings.max_unauthenticated,
                               max_unauthenticated_per_peer=settings.max_unauthenticated_per_peer,
                               operator_token=settings.operator_token or None,
                               model_layout=Layout.of(initial_state),
                               audit=AuditAnswers(settings.run_dir, self.run_id, self.store.audit.public_key))
        self.phase = "waiting"
        self._grpc = None
        self.dashboard: Dashboard | None = None
        self._round_started = time.perf_counter()

    def start(self) -> int:
        """Listen for clients; returns the port (useful with port 0)."""
        self._grpc, port = start_server([self.service.handler()], self.settings.address, self.settings.tls(),
                                        self.service.admission.capacity)
        log.info("event=listening address=%s port=%d run=%s tls=%s mutual_tls=%s resumed_at_round=%d",
                 self.settings.address, port, self.run_id, not self.settings.insecure, bool(self.settings.client_ca),
                 self.server.round)
        if self.settings.dashboard:
            if not self.settings.operator_token or not Path(self.settings.operator_token).is_file():
                raise ConfigError(f"[server] dashboard needs the operator token's digest at operator_token "
                                  f"({self.settings.operator_token!r}); `fedlearn certs` makes it")
            host, _, dash_port = self.settings.dashboard.rpartition(":")
            snapshots = RunSnapshots(self.settings.run_dir)
            self.dashboard = Dashboard(lambda: {**snapshots(), "live": self.live_status()}, host=host or "127.0.0.1",
                                       port=int(dash_port),
                                       token_digest=Path(self.settings.operator_token).read_text().strip())
            self.dashboard.start()
            log.info("event=dashboard url=http://%s:%d/?token=OPERATOR_TOKEN", host or "127.0.0.1",
                     self.dashboard.port)
        return port

    def live_status(self) -> dict[str, Any]:
        """What only the running server knows, for its dashboard: phase, connected clients, refused results."""
        reply = self.status()
        return {"phase": "finished" if self.phase == "finished" else reply.state, "round": reply.round,
                "total_rounds": reply.total_rounds, "connected_clients": list(reply.connected_clients),
                "rejected_results": reply.rejected_results,
                "rejections": [{"client": r.client_id, "round": r.round, "reason": r.reason}
                               for r in list(self.pool.rejections)[-50:]]}

    def run(self, show_progress: bool = False) -> SimulationResult:
        """Run the remaining rounds, tell the clients the run is over, and write the run directory.

        Only a run that completed tells the clients it is over: if the run ends with an exception (or the
        process is interrupted), connected clients just lose their connection and keep reconnecting, so a
        server restarted on the same run directory resumes with them."""
        start = time.perf_counter()
        self.phase, self._round_started = "running", start
        try:
            if show_progress:
                with RoundProgress(self.rounds, self.server.round) as progress:
                    history = self.server.run(self.rounds, [self._log_round, progress])
            else:
                history = self.server.run(self.rounds, [self._log_round])
        except BaseException as exc:
            self.phase = f"stopped after round {self.server.round}: {type(exc).__name__}"
            raise
        self.phase = "finished"
        self.pool.finish(f"run {self.run_id} is over after round {self.server.round}")
        result = SimulationResult(history, self.server.state, Path(self.settings.run_dir), time.perf_counter() - start)
        write_outputs(result)
        return result

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (open streams get `grace` seconds to finish) and close the run store."""
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.store.close()

    def status(self) -> pb.StatusReply:
        rounds, waiting = self.server.history.rounds, self.pool.waiting
        state = f"waiting for clients: {waiting[0]} of {waiting[1]} connected" if waiting else self.phase
        return pb.StatusReply(run_id=self.run_id, state=state, round=self.server.round, total_rounds=self.rounds,
                              connected_clients=self.pool.connected(), last_metrics=rounds[-1].metrics if rounds else {},
                              rejected_results=self.pool.rejected_count)

    def _log_round(self, record: RoundRecord) -> None:
        now = time.perf_counter()
        stats, m = self.pool.last_stats.get("fit"), record.metrics
        log.info("event=round round=%d clients_used=%d clients_failed=%d seconds=%.3f bytes_down=%d bytes_up=%d "
                 "max_train_seconds=%.3f test_accuracy=%s", record.round, m.get("clients_used", 0),
                 m.get("clients_failed", 0), now - self._round_started, stats.bytes_down if stats else 0,
                 stats.bytes_up if stats else 0, stats.max_train_seconds if stats else 0.0,
                 f"{m['test_accuracy']:.4f}" if "test_accuracy" in m else "-")
        self._round_started = now


def deployment_privacy(cfg: SimulationConfig, settings: ServerSettings, strategy: Strategy) -> PrivacySetup:
    """The [privacy] objects of a deployment: central DP and secure aggregation, over the registered clients
    of the allow-list (whose identity keys sign the secure-aggregation key exchange). Local DP is refused:
    its clip and noise would have to be configured on every client."""
    privacy = PrivacyConfig.from_dict(cfg.privacy)
    if privacy.local:
        raise ConfigError("[privacy] local DP (local_dp_clip, local_dp_noise) is simulation-only: each client would "
                          "need its own noise settings. Use central DP (dp_clip) with `fedlearn client --central-dp`, "
                          "or secure aggregation")
    registry = {cid: bytes.fromhex(key) for cid, key in AllowList.load(settings.allow_list).keys.items()}
    population = len(registry)
    if cfg.clients_per_round and cfg.clients_per_round > population:
        raise ConfigError(f"clients_per_round = {cfg.clients_per_round}, but the allow-list registers only "
                          f"{population} clients")
    cohort = cfg.clients_per_round or max(1, round((cfg.fraction or 1.0) * population))
    setup = build_privacy(privacy, client_ids=sorted(registry), cohort=cohort, rounds=cfg.rounds, strategy=strategy,
                          seed=cfg.seed, registry=registry)
    for line in setup.summary:
        log.info("event=privacy %s", line)
    return setup


def serve_app(cfg: SimulationConfig, settings: ServerSettings, app: App | None = None, *,
              show_progress: bool = False, resume: bool = False,
              on_listening: Callable[[int], None] | None = None) -> SimulationResult:
    """Serve a task until done: `app`, else the one `cfg.app` names ([app] in server.toml, --app), else the
    built-in task of `cfg` (an ordinary app too). `cfg` supplies the run settings (rounds, sampling,
    robust aggregation, anomaly checks, privacy); the app's `fit_config` is sent with every fit task, so
    all clients train as configured here. Clients whose model differs from the app's are refused when
    they connect, with the first differing parameter. `on_listening(port)` is called once listening.
    A restart on the same run directory with the same configuration resumes the run; with `resume` it may
    also raise `rounds`.
    """
    if cfg.attack:
        raise ConfigError("attacks are simulated only; remove the [attack] section from the server config")
    app = task_app(cfg, app)
    population = len(AllowList.load(settings.allow_list).keys)
    robust = robustness_setup(cfg, app, population)
    if cfg.asynchronous:  # FedBuff over whichever clients are connected (the [async] section)
        server = DeploymentServer(
            app.initial(cfg.seed), robust.strategy, rounds=cfg.rounds, settings=settings,
            min_clients=robust.min_clients, max_examples=cfg.max_examples, central_eval=robust.app.central_eval,
            anomaly_checks=robust.anomaly_checks, transforms=robust.transforms, fit_config=app.fit_config,
            seed=cfg.seed, run_config=cfg.to_dict(), resume=resume,
            asynchronous=AsyncConfig.for_deployment(cfg.asynchronous).settings())
        return _serve(server, show_progress, on_listening)
    privacy = deployment_privacy(cfg, settings, robust.strategy)
    compression = CompressionSettings.from_dict(cfg.compression)  # validated with the config
    server = DeploymentServer(
        app.initial(cfg.seed), robust.strategy, rounds=cfg.rounds, settings=settings,
        clients_per_round=cfg.clients_per_round, fraction=cfg.fraction, min_clients=robust.min_clients,
        eval_clients=cfg.eval_clients, max_examples=cfg.max_examples, central_eval=robust.app.central_eval,
        evaluate_metrics=app.evaluate_metrics,
        # secure aggregation hides individual updates, so the anomaly checks have nothing to screen
        anomaly_checks=None if privacy.protocol is not None else robust.anomaly_checks,
        transforms=[*privacy.transforms, *([compression.uplink] if compression.uplink else [])],
        protocol=privacy.protocol, sampler=privacy.sampler,
        fit_config=app.fit_config, seed=cfg.seed, run_config=cfg.to_dict(), resume=resume,
        downlink=compression.downlink,
    )
    return _serve(server, show_progress, on_listening)


def _serve(server: DeploymentServer, show_progress: bool, on_listening: Callable[[int], None] | None
           ) -> SimulationResult:
    """Listen, run to the end, and stop serving whatever happens."""
    try:
        port = server.start()
        if on_listening is not None:
            on_listening(port)
        return server.run(show_progress=show_progress)
    finally:
        server.stop()
