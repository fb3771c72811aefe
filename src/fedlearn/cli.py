"""The `fedlearn` command line."""
from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import DATASETS, PARTITIONS, ConfigError, SimulationConfig, load_toml

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
    ("--strategy", "strategy", str, "strategy name, see README (default fedavg)"),
    ("--local-epochs", "local_epochs", int, "local epochs per round (default 5)"),
    ("--batch-size", "batch_size", int, "local batch size (default 5)"),
    ("--lr", "lr", float, "client learning rate (default 0.1)"),
    ("--momentum", "momentum", float, "client SGD momentum (default 0)"),
    ("--crash-rate", "crash_rate", float, "fraction of sampled clients that crash each round (default 0)"),
    ("--drop-rate", "drop_rate", float, "fraction of sampled clients that drop out each round (default 0)"),
    ("--straggler-rate", "straggler_rate", float, "fraction of clients finishing only part of their work (default 0)"),
    ("--seed", "seed", int, "seed for data split, sampling, faults and initialisation (default 0)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlearn", description="Federated learning: simulate, serve, audit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every client failure")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run a federated simulation on built-in data",
        description="Run a federated simulation. Settings come from defaults, then --config, then flags.",
    )
    sim.add_argument("--config", type=Path, help="TOML file with settings (see README)")
    sim.add_argument("--run-dir", type=Path, help="where to write the run (default runs/<time>)")
    sim.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last committed round")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, dest, kind, help_text in _SIM_FLAGS:
        sim.add_argument(flag, dest=dest, type=kind, help=help_text, default=None)
    sim.add_argument("--param", "-p", dest="strategy_param", action="append", default=[], metavar="KEY=VALUE",
                     help="a strategy parameter, repeatable (e.g. -p mu=1.0 -p server_lr=0.5)")
    sim.add_argument("--mu", type=float, help="shortcut for -p mu=VALUE (FedProx proximal strength)")
    sim.add_argument("--server-lr", type=float, help="shortcut for -p server_lr=VALUE")
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
    strategy_params = {**values.get("strategy_params", {}), **shortcuts, **parse_params(args.strategy_param)}
    if strategy_params:
        flags["strategy_params"] = strategy_params
    if "fraction" in flags and "clients_per_round" not in flags:
        values["clients_per_round"] = None
    if "clients_per_round" in flags and "fraction" not in flags:
        values["fraction"] = None
    return {**values, **flags}


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate

    if args.resume:
        run_dir, resume = args.resume, True
        config = None
    else:
        config = SimulationConfig.from_dict(_simulation_settings(args))
        run_dir = args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
        resume = False
        print(f"fedlearn: {config.dataset}, {config.num_clients} clients ({config.partition}), "
              f"{config.strategy}, {config.rounds} rounds, seed {config.seed}")
    result = simulate(config, run_dir=run_dir, resume=resume, show_progress=not args.quiet)
    last = result.history.last
    print(f"final test accuracy: {last.get('test_accuracy', float('nan')):.4f}  "
          f"(test loss {last.get('test_loss', float('nan')):.4f}, {result.seconds:.1f}s)")
    print(f"run directory: {result.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"simulate": cmd_simulate}[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"fedlearn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
