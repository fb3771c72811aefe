"""The deployment subcommands of `fedlearn`: `server`, `client`, `certs`, `he-keys`, `status`.

Heavy imports (gRPC, torch) happen inside the handlers, so `fedlearn --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any
from pathlib import Path

from ..compression.settings import add_compression_flags
from ..config import ConfigError

SimFlag = tuple[str, str, type, str]
_CLIENT_DATA_FLAGS = ("dataset", "data_path", "partition", "alpha", "shards_per_client", "num_clients", "model", "seed")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def add_parsers(sub: argparse._SubParsersAction, sim_flags: Sequence[SimFlag]) -> None:
    """Add the deployment subcommands; `sim_flags` are the simulation's data flags, reused by `client`."""
    server = sub.add_parser("server", help="serve a federated run to remote clients over gRPC",
                            description="Serve a run: the run settings come from --config (the sections of a "
                                        "simulation config plus [server]), the task from your app (--app or [app]) "
                                        "or a built-in data set; clients connect to it. See README, Deployment.")
    server.add_argument("--config", type=Path, required=True, help="server.toml")
    add_app_flags(server)
    server.add_argument("--address", help="HOST:PORT to listen on (overrides [server] address)")
    server.add_argument("--run-dir", help="run directory; restarting on the same one resumes the run")
    server.add_argument("--rounds", type=positive_int, help="number of rounds (overrides the config's rounds)")
    server.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory for more rounds: the config may raise rounds "
                             "and change nothing else")
    server.add_argument("--insecure", action="store_true", help="no TLS (plain text; a warning is logged)")
    server.add_argument("--quiet", action="store_true", help="no progress bar")

    client = sub.add_parser("client", help="run a client process that connects to a server",
                            description="Connect to a server, train on each task, send signed results, "
                                        "reconnect after lost connections. Data: a built-in data set's partition "
                                        "(--dataset ... --client-index K) or your own (--client-module).")
    client.add_argument("--server", required=True, help="server address HOST:PORT")
    client.add_argument("--credentials", type=Path, required=True,
                        help="this client's folder from `fedlearn certs` (client_id, identity.key, ca.pem, ...)")
    client.add_argument("--insecure", action="store_true", help="no TLS (only if the server runs --insecure)")
    client.add_argument("--retry-for", type=float, default=600.0,
                        help="give up after this many seconds without a connection (default 600)")
    client.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads for local training (default 1: fastest for small models and fair to "
                             "other processes on the machine; raise it for large models)")
    client.add_argument("--client-index", type=int, help="which partition of the built-in data set (0-based)")
    for flag, dest, kind, help_text in sim_flags:
        if dest in _CLIENT_DATA_FLAGS:
            client.add_argument(flag, dest=dest, type=kind, help=help_text + "; must match the server's", default=None)
    client.add_argument("--client-module", metavar="MODULE:FUNCTION",
                        help="your factory: FUNCTION(client_id, **client-args) returns a fedlearn.Client")
    client.add_argument("--client-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the factory, repeatable")
    client.add_argument("--app-dir", default=".", help="folder to import --client-module from (default .)")
    client.add_argument("--central-dp", action="store_true",
                        help="clip each update to the norm the server sends (needed when the server's [privacy] "
                             "sets dp_clip; the server adds the noise)")
    add_compression_flags(client, downlink=False)  # the downlink's settings come with the server's messages
    client.add_argument("--receipts", type=Path, metavar="DIR",
                        help="where to keep the audit receipts the server sends (default: CREDENTIALS/receipts)")
    client.add_argument("--audit-key", metavar="HEX",
                        help="the server's audit public key; default: trust the key first seen for the run")
    client.add_argument("--peer-keys", type=Path, metavar="ALLOWLIST",
                        help="check other clients' secure-aggregation signatures against this allow-list instead "
                             "of the keys the server announces, and defend against a malicious server: refuse "
                             "sparse (SecAgg+) graphs")
    client.add_argument("--secagg-min-cohort", type=int, default=2, metavar="N",
                        help="refuse secure-aggregation rounds with fewer than N clients (default 2)")
    client.add_argument("--secagg-min-noise", type=float, default=0.0, metavar="Z",
                        help="refuse distributed-DP rounds whose noise multiplier is below Z (default 0)")
    client.add_argument("--statistics", choices=("secure", "plain", "off"), default="secure",  # run_client's policies
                        help="federated statistics this client answers: only inside secure aggregation (default), "
                             "also in the clear (plain), or none (off)")
    client.add_argument("--he-key", type=Path, metavar="SECRET_CONTEXT",
                        help="the secret CKKS context from `fedlearn he-keys` (for a server with [privacy] he = true)")

    he_keys = sub.add_parser("he-keys", help="create the CKKS key for homomorphic-encryption aggregation",
                             description="Write he_secret.ctx (give it to every client, never to the server) and "
                                         "he_public.ctx (the server's [privacy] he_public_key).")
    he_keys.add_argument("--out", type=Path, required=True, help="folder to write the two contexts to")
    he_keys.add_argument("--force", action="store_true", help="replace an existing he_secret.ctx")

    certs = sub.add_parser("certs", help="create a CA, server certificate, client credentials and allow-list",
                           description="Create (or extend) a credentials folder. Run again on the same folder to "
                                       "add clients; the CA and server certificate are kept.")
    certs.add_argument("--out", type=Path, required=True, help="credentials folder")
    certs.add_argument("--server-name", action="append", default=[],
                       help="DNS name or IP clients use to reach the server, repeatable (localhost and 127.0.0.1 "
                            "are always included)")
    group = certs.add_mutually_exclusive_group()
    group.add_argument("--clients", type=int, help="create clients named 0..N-1")
    group.add_argument("--client", action="append", default=[], metavar="ID", help="create a client named ID, repeatable")
    certs.add_argument("--identity-only", action="store_true",
                       help="on a client's machine: make only its identity key in --out and print the allow-list "
                            "line for the server's operator (needs one --client)")
    certs.add_argument("--force", action="store_true",
                       help="replace private key files that are in the way (an existing identity is refused "
                            "without it)")

    status = sub.add_parser("status", help="show a running server's round, clients and last metrics",
                            description="Needs credentials: a registered client's folder (--credentials), or the "
                                        "operator token from `fedlearn certs` (--token, with --ca).")
    status.add_argument("--server", required=True, help="server address HOST:PORT")
    add_call_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON")


def add_app_flags(parser: argparse.ArgumentParser) -> None:
    """--app, --app-arg, --app-dir: the user's task, as the [app] section of a config names it."""
    parser.add_argument("--app", metavar="MODULE:FUNCTION",
                        help="your task: FUNCTION(**app-args) returns a fedlearn.App (model, strategy, evaluation); "
                             "replaces the built-in data set and model")
    parser.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the app factory, repeatable")
    parser.add_argument("--app-dir", help="folder to import --app from (default: the current folder)")


def app_settings(args: argparse.Namespace, values: dict) -> dict:
    """The [app] settings of `values` (a read config) with the --app flags applied."""
    from ..cli import parse_params

    app = dict(values.get("app") or {})
    if args.app:
        app = {"factory": args.app, "dir": args.app_dir or "."}
    elif args.app_dir:
        app["dir"] = args.app_dir
    app.update(parse_params(args.app_arg))
    if app and "factory" not in app:
        raise ConfigError("--app-arg and --app-dir need an app: --app MODULE:FUNCTION or [app] factory = ...")
    return app


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_server(args: argparse.Namespace) -> int:
    from ..server import RoundFailedError
    from .remote_pool import NotEnoughClientsError
    from .server_process import load_server_config, serve_app

    _log_structured()
    cfg, settings = load_server_config(args.config)
    cfg.app = app_settings(args, cfg.to_dict())
    if args.rounds is not None:
        cfg.rounds = args.rounds
    cfg.validate()
    for name in ("address", "run_dir"):
        if getattr(args, name):
            setattr(settings, name, getattr(args, name))
    settings.insecure = settings.insecure or args.insecure
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server as Ctrl-C does, saying what was saved
    task = f"app {cfg.app['factory']}" if cfg.app else f"{cfg.dataset}, {cfg.strategy}"
    steps = f"{cfg.rounds} asynchronous (FedBuff) server steps" if cfg.asynchronous else f"{cfg.rounds} rounds"
    print(f"fedlearn server: {task}, {steps}, run directory {settings.run_dir}")
    try:
        result = serve_app(cfg, settings, show_progress=not args.quiet, resume=args.resume,
                           on_listening=lambda port: print(f"listening on port {port}", flush=True))
    except (NotEnoughClientsError, RoundFailedError, OSError) as exc:
        print(f"fedlearn: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedlearn: stopped; {_saved(settings.run_dir)} Connected clients keep trying to reconnect; the same "
              f"command resumes the run from its last committed round.", file=sys.stderr)
        return 130
    print(result.summary())
    print(f"run directory: {result.run_dir}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _saved(run_dir: str) -> str:
    """What a stopped server left in `run_dir`, in a sentence."""
    from ..server.store import RunStore

    try:
        store = RunStore(run_dir, readonly=True)
    except (FileNotFoundError, OSError):
        return f"no round was committed ({run_dir} holds no run store)."
    try:
        last = store.last_round() or 0
    finally:
        store.close()
    if last == 0:
        return f"no round was completed; the run store {Path(run_dir) / 'run.sqlite'} holds the initial model."
    return (f"rounds 1-{last} are committed in {Path(run_dir) / 'run.sqlite'} (model, metrics, participants); "
            "the round in progress, if any, is lost.")


def cmd_client(args: argparse.Namespace) -> int:
    from ..cli import parse_params
    from ..compression.settings import compression_flags, compression_from_spec
    from ..config import SimulationConfig
    from .certs import ClientBundle
    from .client_factory import builtin_client, user_client
    from ..privacy.central import CentralDPClient
    from ..audit.log import AuditError
    from ..audit.receipts import ReceiptBook
    from .client_process import ClientRejected, run_client
    from ..secagg.protocol import ClientPolicy
    from .secagg_handlers import load_peer_keys, secagg_handlers

    import torch

    _log_structured()
    torch.set_num_threads(args.threads)
    bundle = ClientBundle.load(args.credentials)
    if args.client_module:
        client = user_client(args.client_module, bundle.client_id, parse_params(args.client_arg), args.app_dir)
    elif args.client_index is not None:
        values = {k: getattr(args, k) for k in _CLIENT_DATA_FLAGS if getattr(args, k) is not None}
        client = builtin_client(SimulationConfig.from_dict(values), args.client_index, bundle.client_id)
    else:
        raise ConfigError("say where the data comes from: --client-index K (with --dataset ...) or --client-module")
    try:  # must match the server's [compression.uplink]
        compression = compression_from_spec(compression_flags(args).get("uplink"), "--compress")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    pinned = load_peer_keys(args.peer_keys) if args.peer_keys else None
    # secure aggregation needs nothing but these handlers: its settings come with each round's plan
    policy = ClientPolicy(full_graph_only=pinned is not None, min_cohort=args.secagg_min_cohort,
                          min_noise=args.secagg_min_noise)
    handlers = secagg_handlers(bundle.client_id, bundle.identity, pinned, policy)
    if args.he_key:
        from ..he import HEClient

        handlers.update(HEClient(args.he_key.read_bytes()).handlers())
    try:
        reason = run_client(client, args.server, identity=bundle.identity, tls=None if args.insecure else bundle.tls,
                            transforms=[*([CentralDPClient()] if args.central_dp else []),
                                        *([compression] if compression else [])], handlers=handlers,
                            retry_for=args.retry_for, receipts=ReceiptBook(args.receipts or args.credentials / "receipts"),
                            audit_key=args.audit_key, statistics=args.statistics)
    except (ClientRejected, ConnectionError) as exc:
        print(f"fedlearn: error: {exc}", file=sys.stderr)
        return 1
    except AuditError as exc:
        print(f"fedlearn: error: the run ended, but the server's audit receipts do not check out: {exc}",
              file=sys.stderr)
        return 1
    print(f"done: {reason}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import DEFAULT_SERVER_NAMES, create, create_identity

    if args.identity_only:
        if len(args.client) != 1:
            raise ConfigError("--identity-only needs exactly one --client ID")
        line = create_identity(args.out, args.client[0], force=args.force)
        print(f"identity key written to {args.out / 'identity.key'}; send this line to the server's operator for "
              f"its allow-list:\n{line}", end="")
        return 0
    ids = [str(i) for i in range(args.clients)] if args.clients is not None else args.client
    folders = create(args.out, ids, args.server_name or DEFAULT_SERVER_NAMES, force=args.force)
    print(f"credentials in {args.out}: ca.pem, server.pem/server.key, allowlist.txt, "
          "operator.token (for `fedlearn status --token`)")
    for folder in folders:
        print(f"  client bundle: {folder}")
    print(f"keep {args.out / 'ca.key'} secret; give each client only its own folder")
    return 0


def cmd_he_keys(args: argparse.Namespace) -> int:
    from ..he import create_keys
    from .identity import write_private

    secret, public = create_keys()
    write_private(args.out / "he_secret.ctx", secret, force=args.force)  # 0600 from the start, never a symlink
    (args.out / "he_public.ctx").write_bytes(public)
    print(f"CKKS key in {args.out}: he_secret.ctx for every client (--he-key; never give it to the server), "
          "he_public.ctx for the server ([privacy] he_public_key)")
    return 0


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a call to a running server with client or operator credentials (`call_credentials`)."""
    parser.add_argument("--ca", type=Path, help="CA certificate that signed the server's (default: from --credentials)")
    parser.add_argument("--credentials", type=Path,
                        help="a client folder: its identity signs the request (its CA and, with mutual TLS, its "
                             "certificate are used too)")
    parser.add_argument("--token", type=Path, metavar="FILE", help="the operator token file (certs/operator.token)")
    parser.add_argument("--insecure", action="store_true", help="no TLS")


def call_credentials(args: argparse.Namespace, what: str) -> tuple[Any, list]:
    """The TLS settings and call metadata for `what` (a call to a running server) from `add_call_arguments`' flags."""
    from .certs import ClientBundle
    from .channels import ClientTLS
    from .status_auth import client_metadata, token_metadata

    bundle = ClientBundle.load(args.credentials) if args.credentials else None
    if args.token:
        credentials = token_metadata(args.token)
    elif bundle is not None:
        credentials = client_metadata(bundle.client_id, bundle.identity)
    else:
        raise ConfigError(f"{what} needs credentials: --credentials CLIENT_FOLDER, or --token certs/operator.token")
    if args.insecure:
        tls = None
    elif bundle is not None:
        tls = bundle.tls
    elif args.ca:
        tls = ClientTLS(args.ca)
    else:
        raise ConfigError("give --ca (or --credentials) to check the server's certificate, or --insecure")
    return tls, credentials


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from .status import format_status, query_status

    tls, credentials = call_credentials(args, "status")
    try:
        reply = query_status(args.server, tls, credentials)
    except grpc.RpcError as exc:
        print(f"fedlearn: error: no status from {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_status(reply, as_json=args.json))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "server": cmd_server, "client": cmd_client, "certs": cmd_certs, "he-keys": cmd_he_keys, "status": cmd_status,
}


def _log_structured() -> None:
    """Deployment processes log their key=value lines (INFO and up) with timestamps to stderr."""
    logger = logging.getLogger("fedlearn")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
