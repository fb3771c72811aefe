"""The `fedlearn` command line."""
from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from . import run_commands
from .compression.settings import add_compression_flags, compression_flags
from .config import DATASETS, PARTITIONS, ConfigError, SimulationConfig, load_toml
from .transport import commands as deployment
from .server.anomaly import flag_counts
from .server.store import RoundRecord

# flag -> (field, type, help)
_SIM_FLAGS: list[tuple[str, str, type, str]] = [
    ("--dataset", "dataset", str, f"built-in data: {', '.join(DATASETS)} (default digits)"),
    ("--data-path", "data_path", str, "file or folder for femnist (npz) and leaf (JSON) data"),
    ("--partition", "partition", str, f"how to split data over clients: {', '.join(PARTITIONS)} (default dirichlet)"),
    ("--alpha", "alpha", float, "Dirichlet concentration for label skew; smaller is more skewed (default 0.5)"),
    ("--shards-per-client", "shards_per_client", int, "shards per client for the 'shards' partition (default 2)"),
    ("--num-clients", "num_clients", int, "number of clients (default 100)"),
    ("--model", "model", str, "mlp or logreg (default mlp)"),
    ("--rounds", "rounds", int, "number of rounds (default 30)"),
    ("--clients-per-round", "clients_per_round", int, "clients sampled per round (default 10)"),
    ("--fraction", "fraction", float, "sample this fraction of clients per round instead of a count"),
    ("--min-clients", "min_clients", int, "fewest usable updates for a round to count (default 1)"),
    ("--eval-clients", "eval_clients", int, "clients sampled for federated evaluation per round (default 10)"),
    ("--max-examples", "max_examples", int, "cap on the example count a client may claim, its weight in the mean "
                                            "(default 100000)"),
    ("--strategy", "strategy", str, "strategy name, see README (default fedavg)"),
    ("--local-epochs", "local_epochs", int, "local epochs per round (default 5)"),
    ("--batch-size", "batch_size", int, "local batch size (default 5)"),
    ("--lr", "lr", float, "client learning rate (default 0.1)"),
    ("--momentum", "momentum", float, "client SGD momentum (default 0)"),
    ("--crash-rate", "crash_rate", float, "fraction of sampled clients that crash each round (default 0)"),
    ("--drop-rate", "drop_rate", float, "fraction of sampled clients that drop out each round (default 0)"),
    ("--straggler-rate", "straggler_rate", float, "fraction of clients finishing only part of their work (default 0)"),
    ("--seed", "seed", int, "seed for data split, sampling, faults and initialisation (default 0)"),
    ("--backend", "backend", str, "where clients train: sequential (default), vectorized (a cohort at once), "
                                  "process (every core), ray"),
    ("--ray-address", "ray_address", str, "with --backend ray: the cluster to join: auto (started on this machine), "
                                          "HEAD:6379 or ray://HEAD:10001; default: start Ray on this machine"),
    ("--aggregator", "aggregator", str, "robust aggregator replacing the strategy's mean: median, trimmed_mean, krum, "
                                        "multi_krum, bulyan, centered_clipping, norm_bounding, fltrust"),
    ("--attack", "attack", str, "simulated attack: label_flip, sign_flip, noise, alie, ipm, backdoor (default none)"),
    ("--attack-fraction", "attack_fraction", float, "fraction of clients that are attackers (default 0.2)"),
]

# flag -> (key of the [privacy] section, type, help); a bool type makes an on/off switch
_PRIVACY_FLAGS: list[tuple[str, str, type, str]] = [
    ("--dp-clip", "dp_clip", float, "central DP: clip every client update to this L2 norm (default off)"),
    ("--dp-noise", "dp_noise", float, "central DP noise multiplier z (noise std z * clip on the sum)"),
    ("--target-epsilon", "target_epsilon", float, "central DP: pick the noise for this epsilon after all rounds"),
    ("--dp-delta", "dp_delta", float, "delta of the privacy accounting (default 1e-5)"),
    ("--epsilon-budget", "epsilon_budget", float, "stop before a round would exceed this epsilon"),
    ("--dp-accountant", "accountant", str, "rdp or pld (default rdp)"),
    ("--dp-sampling", "sampling", str, "fixed (default) or poisson client sampling, as accounted"),
    ("--adaptive-clip", "adaptive_clip", bool, "adapt the clip norm to a quantile of update norms"),
    ("--local-dp-clip", "local_dp_clip", float, "local DP: clip norm on each client"),
    ("--local-dp-noise", "local_dp_noise", float, "local DP: noise multiplier on each client"),
    ("--secagg", "secagg", bool, "secure aggregation: the server sees only the sum of updates"),
    ("--secagg-graph", "secagg_graph", str, "sparse (SecAgg+, default) or full"),
    ("--secagg-threshold", "secagg_threshold", float, "fraction of a neighbourhood needed to unmask (default 0.5)"),
    ("--secagg-range", "secagg_range", float, "clip each coordinate to +-this before quantising (default dp-clip or 1)"),
    ("--dp-distributed", "dp_distributed", bool, "distributed DP: clients add the noise inside secure aggregation"),
    ("--he", "he", bool, "homomorphic-encryption aggregation (CKKS): the server adds ciphertexts, clients decrypt"),
]

# ----- asynchronous training (FedBuff): flag -> (key of the [async] section, type, help); any of them turns it on
_ASYNC_FLAGS: list[tuple[str, str, type, str]] = [
    ("--buffer-size", "buffer_size", int, "async: results per server step, K (default 10)"),
    ("--concurrency", "concurrency", int, "async: clients training at once (default 20)"),
    ("--max-staleness", "max_staleness", int, "async: drop results more than this many steps old (default: keep all)"),
    ("--staleness", "staleness", str, "async: weight of a result s steps old: sqrt (1/sqrt(1+s), default), poly, "
                                      "constant"),
    ("--staleness-exponent", "staleness_exponent", float, "async: exponent of --staleness poly (default 0.5)"),
    ("--eval-every", "eval_every", int, "async: evaluate centrally every that many steps (default 1)"),
    ("--speed-sigma", "speed_sigma", float, "async simulation: spread of client speeds, lognormal sigma (default 1)"),
    ("--mean-online", "mean_online", float, "async simulation: mean seconds a client stays online (default 100)"),
    ("--mean-offline", "mean_offline", float, "async simulation: mean seconds offline in between (default 0: never)"),
    ("--fleet-seed", "fleet_seed", int, "async simulation: seed of the virtual fleet (default: --seed)"),
]


def add_async_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async", dest="async_on", action="store_true",
                        help="buffered asynchronous training (FedBuff) instead of rounds: --rounds counts server steps")
    for flag, key, kind, help_text in _ASYNC_FLAGS:
        parser.add_argument(flag, dest=f"async_{key}", type=kind, default=None, help=help_text)


def async_settings(args: argparse.Namespace, values: dict[str, Any]) -> dict[str, Any]:
    """The [async] section of `values` with the async flags on top ({} when neither turns async on)."""
    given = {key: getattr(args, f"async_{key}") for _, key, _, _ in _ASYNC_FLAGS
             if getattr(args, f"async_{key}") is not None}
    merged = {**values.get("asynchronous", {}), **given}
    if merged or not args.async_on:
        return merged
    from .asynchronous import AsyncConfig

    return {"buffer_size": AsyncConfig.buffer_size}  # the defaults (a non-empty section turns async on)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (what is wrong and where to look), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedlearn", description="Federated learning: simulate, serve, audit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every client failure")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run a federated simulation of your app or a built-in data set",
        description="Run a federated simulation. Settings come from defaults, then --config, then flags.",
    )
    sim.add_argument("--config", type=Path, help="TOML file with settings (see README)")
    sim.add_argument("--run-dir", type=Path, help="where to write the run (default runs/<time>)")
    sim.add_argument("--resume", type=Path, metavar="DIR",
                     help="continue the run in DIR from its last committed round, with its stored settings; "
                          "--rounds may raise the number of rounds, any other setting is refused")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    deployment.add_app_flags(sim)
    sim.add_argument("--threads", type=int, default=1,
                     help="torch threads per process (default 1: faster for small models, see README)")
    for flag, dest, kind, help_text in _SIM_FLAGS:
        sim.add_argument(flag, dest=dest, type=kind, help=help_text, default=None)
    sim.add_argument("--param", "-p", dest="strategy_param", action="append", default=[], metavar="KEY=VALUE",
                     help="a strategy parameter, repeatable (e.g. -p mu=1.0 -p server_lr=0.5)")
    sim.add_argument("--aggregator-param", "-a", dest="aggregator_param", action="append", default=[],
                     metavar="KEY=VALUE", help="an aggregator parameter, repeatable (e.g. -a f=2 -a m=5)")
    sim.add_argument("--attack-param", dest="attack_param", action="append", default=[], metavar="KEY=VALUE",
                     help="an attack parameter, repeatable (e.g. --attack-param scale=4)")
    sim.add_argument("--anomaly-param", dest="anomaly_param", action="append", default=[], metavar="KEY=VALUE",
                     help="an anomaly-check threshold, repeatable (e.g. --anomaly-param norm_z=4)")
    sim.add_argument("--no-anomaly-checks", dest="anomaly_checks", action="store_const", const=False, default=None,
                     help="do not screen updates for norm and direction outliers")
    for flag, key, kind, help_text in _PRIVACY_FLAGS:
        if kind is bool:
            sim.add_argument(flag, dest=f"privacy_{key}", action="store_const", const=True, default=None, help=help_text)
        else:
            sim.add_argument(flag, dest=f"privacy_{key}", type=kind, default=None, help=help_text)
    sim.add_argument("--mu", type=float, help="shortcut for -p mu=VALUE (FedProx proximal strength)")
    sim.add_argument("--server-lr", type=float, help="shortcut for -p server_lr=VALUE")
    sim.add_argument("--contributions", metavar="METHODS",
                     help="score each client's contribution every round: comma-separated gtg, loo, exact, cosine")
    add_compression_flags(sim)  # compression (issue 13)
    add_async_flags(sim)
    deployment.add_parsers(sub, _SIM_FLAGS)
    run_commands.add_parsers(sub)
    return parser


def parse_params(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings into a dict, values read as TOML scalars (numbers, booleans, quoted strings)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"parameter {item!r} must look like KEY=VALUE")
        try:
            params[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            params[key.strip()] = text.strip()
    return params


def _simulation_settings(args: argparse.Namespace) -> dict[str, Any]:
    values = load_toml(args.config) if args.config else {}
    names = {f.name for f in fields(SimulationConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    shortcuts = {k: getattr(args, k) for k in ("mu", "server_lr") if getattr(args, k) is not None}
    for name, items in (("strategy_params", args.strategy_param), ("aggregator_params", args.aggregator_param),
                        ("attack_params", args.attack_param), ("anomaly_params", args.anomaly_param)):
        given = {**(shortcuts if name == "strategy_params" else {}), **parse_params(items)}
        if given:
            flags[name] = {**values.get(name, {}), **given}
    privacy = {key: getattr(args, f"privacy_{key}") for _, key, _, _ in _PRIVACY_FLAGS
               if getattr(args, f"privacy_{key}") is not None}
    if privacy:
        flags["privacy"] = {**values.get("privacy", {}), **privacy}
    app = deployment.app_settings(args, values)
    if app:
        flags["app"] = app
    compression = compression_flags(args)
    if compression:
        flags["compression"] = {**values.get("compression", {}), **compression}
    if args.contributions:
        flags["contributions"] = {**values.get("contributions", {}),
                                  "methods": [m.strip() for m in args.contributions.split(",") if m.strip()]}
    asynchronous = async_settings(args, values)
    if asynchronous:
        flags["asynchronous"] = asynchronous
    if "fraction" in flags and "clients_per_round" not in flags:
        values["clients_per_round"] = None
    if "clients_per_round" in flags and "fraction" not in flags:
        values["fraction"] = None
    return {**values, **flags}


def _resumed_settings(args: argparse.Namespace) -> SimulationConfig:
    """The stored configuration of the run in `args.resume`, with the settings given on the command line on
    top (the run store then refuses any change but a higher `rounds`, naming it)."""
    from .server.store import stored_config

    if args.run_dir is not None and args.run_dir != args.resume:
        raise ConfigError(f"--resume {args.resume} continues the run in that directory; drop --run-dir {args.run_dir}")
    return SimulationConfig.from_dict({**stored_config(args.resume), **_simulation_settings(args)})


def cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from .simulate import simulate

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.resume:
        run_dir, resume = args.resume, True
        config = _resumed_settings(args)
    else:
        config = SimulationConfig.from_dict(_simulation_settings(args))
        run_dir = args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
        resume = False
        robust = (f" + {config.aggregator}" if config.aggregator else "") + (
            f", attack {config.attack} by {config.attack_fraction:.0%} of clients" if config.attack else "")
        split = {"synthetic": f"{config.num_clients} devices (natural split)",
                 "femnist": "writers as clients (natural split)", "leaf": "users as clients (natural split)",
                 }.get(config.dataset, f"{config.num_clients} clients ({config.partition})")
        task = f"app {config.app['factory']}" if config.app else f"{config.dataset}, {split}, {config.strategy}"
        asynchronous = config.async_config()
        steps = (f"{config.rounds} rounds" if asynchronous is None else
                 f"FedBuff {config.rounds} server steps of {asynchronous.buffer_size} results, "
                 f"{asynchronous.concurrency} clients at once")
        print(f"fedlearn: {task}{robust}, {steps}, seed {config.seed}", flush=True)
    result = simulate(config, run_dir=run_dir, resume=resume, show_progress=not args.quiet)
    last = result.history.last
    print(result.summary())
    if "dp_epsilon" in last:
        print(f"privacy spent: epsilon {last['dp_epsilon']:.3f} over {int(last['dp_rounds'])} noised rounds")
    if "test_backdoor_success" in last:
        print(f"backdoor success rate: {last['test_backdoor_success']:.4f}")
    print_flagged(result.history.rounds)
    print(f"run directory: {result.run_dir}")
    return 0


def print_flagged(rounds: list[RoundRecord]) -> None:
    """Name the clients the anomaly checks flagged in more than one round (suspects worth a look)."""
    repeat = [(cid, n) for cid, n in flag_counts(rounds).most_common() if n > 1]
    if repeat:
        print(f"clients flagged in several rounds ({len(repeat)}): "
              + ", ".join(f"{cid} ({n} rounds)" for cid, n in repeat))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"simulate": cmd_simulate, **deployment.COMMANDS, **run_commands.COMMANDS}[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"fedlearn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
