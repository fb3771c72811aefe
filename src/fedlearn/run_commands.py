"""Subcommands that read a run directory: `audit verify|prove|consistency`, `report contributions`,
`dashboard`. None of them writes to the run store, so they are safe on a run that is still going."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="verify a run's audit log or print proofs from it",
                           description="The audit log: one Merkle-tree record per round with signed tree heads.")
    steps = audit.add_subparsers(dest="audit_command", required=True)
    verify = steps.add_parser("verify", help="recompute the log from the run store and report any tampering")
    verify.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    verify.add_argument("--head", type=Path, action="append", default=[], metavar="FILE",
                        help="a tree head (or a client's receipt) held outside the run directory; the log must "
                             "extend it (repeatable)")
    verify.add_argument("--key", metavar="HEX|FILE",
                        help="the server's audit public key (hex, or a file holding it); default: the key the run "
                             "store names, which only proves anything against someone without the private key")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    prove = steps.add_parser("prove", help="print the receipt (head, record, inclusion proof) of a client's round")
    prove.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    prove.add_argument("--client", required=True, metavar="ID")
    prove.add_argument("--round", type=int, required=True, metavar="R")
    consistency = steps.add_parser(
        "consistency", help="prove the log extends an earlier head: from RUN_DIR, or asked of a running server",
        description="With RUN_DIR: print the proof that the log extends the head. With --server: ask the running "
                    "server for that proof (signed with --credentials, or with the operator --token) and check it "
                    "against the head's key (or --key); exit 1 if the server's log was rewritten or truncated.")
    consistency.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR")
    consistency.add_argument("--head", type=Path, required=True, metavar="FILE", help="the earlier head or receipt")
    consistency.add_argument("--server", metavar="HOST:PORT", help="ask this running server instead of reading RUN_DIR")
    consistency.add_argument("--to-size", type=int, default=0, metavar="N",
                             help="prove up to the server's head of N records (default: its newest)")
    consistency.add_argument("--key", metavar="HEX|FILE", help="the server's audit public key (default: the head's)")
    from .transport.commands import add_call_arguments

    add_call_arguments(consistency)

    report = sub.add_parser("report", help="summary of runs: `report RUN_DIR [RUN_DIR ...]` (side by side), "
                                           "`report contributions RUN_DIR`",
                            description="`fedlearn report RUN_DIR`: configuration, rounds, final and best metrics, "
                                        "failures by reason, flagged clients, epsilon and time of a finished or "
                                        "running run; several run directories are compared side by side. "
                                        "`fedlearn report contributions RUN_DIR`: the payout split by contribution.")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or `contributions RUN_DIR`)")
    report.add_argument("--budget", type=float, default=100.0, help="amount to split (default 100)")
    report.add_argument("--method", default="gtg", help="score to split by: gtg, loo, exact, cosine (default gtg)")
    report.add_argument("--out", type=Path, help="write the CSV here instead of standard output")

    dashboard = sub.add_parser("dashboard", help="serve a read-only dashboard of a run on 127.0.0.1",
                               description="Rounds, timing, metric curves, failures and flagged updates, privacy, "
                                           "contributions and the audit log of a finished or running run.")
    dashboard.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    dashboard.add_argument("--port", type=int, default=8050, help="port on 127.0.0.1 (default 8050; 0 picks one)")


def _public_key(value: str | None) -> str | None:
    if value is None:
        return None
    text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
    try:
        if len(bytes.fromhex(text)) == 32:
            return text.lower()
    except ValueError:
        pass
    raise ConfigError(f"--key must be 64 hex digits or a file holding them, got {value!r}")


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit.receipts import load_head
    from .audit.verify import consistency, prove, verify_run

    if args.audit_command == "prove":
        print(json.dumps(prove(args.run_dir, args.client, args.round).to_json(), indent=1))
        return 0
    if args.audit_command == "consistency" and args.server:
        return _remote_consistency(args, load_head(args.head))
    if args.audit_command == "consistency":
        if args.run_dir is None:
            raise ConfigError("audit consistency needs RUN_DIR, or --server HOST:PORT to ask a running server")
        old = load_head(args.head)
        head, proof = consistency(args.run_dir, old.size)
        print(json.dumps({"old": old.to_json(), "head": head.to_json(), "proof": [p.hex() for p in proof]}, indent=1))
        return 0
    result = verify_run(args.run_dir, heads=[load_head(p) for p in args.head], public_key=_public_key(args.key))
    if args.json:
        print(json.dumps({"ok": result.ok, "size": result.size, "root": result.root, "public_key": result.public_key,
                          "pinned": result.pinned, "problems": result.problems}, indent=1))
    else:
        for problem in result.problems:
            print(f"FAIL: {problem}")
        state = "OK" if result.ok else f"{len(result.problems)} problem(s)"
        print(f"audit log of {args.run_dir}: {state}; {result.size} records, root {result.root}, "
              f"{'pinned' if result.pinned else 'stored'} key {result.public_key[:16]}...")
        if not result.pinned:
            print("note: signatures were checked with the key the run store names; pass --key or --head to check "
                  "against what you hold outside this directory")
    return 0 if result.ok else 1


def _remote_consistency(args: argparse.Namespace, held: Any) -> int:
    """`audit consistency --server`: the server's proof that its log extends `held`, checked here."""
    from .audit.log import AuditError
    from .transport.audit_rpc import fetch_consistency
    from .transport.commands import call_credentials

    if args.run_dir is not None:
        raise ConfigError("give RUN_DIR or --server, not both")
    if args.to_size < 0:
        raise ConfigError(f"--to-size must be a number of records, got {args.to_size}")
    tls, credentials = call_credentials(args, "audit consistency --server")
    try:
        head = fetch_consistency(args.server, tls, credentials, held, to_size=args.to_size,
                                 public_key=_public_key(args.key))
    except AuditError as exc:
        print(f"FAIL: {exc}")
        return 1
    print(json.dumps({"ok": True, "old": held.to_json(), "head": head.to_json()}, indent=1))
    print(f"OK: {args.server}'s log of {head.size} records extends the held head of {held.size}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.runs[0] != "contributions":
        from .run_summary import report_text

        print(report_text(args.runs))
        return 0
    if len(args.runs) != 2:
        raise ConfigError("usage: fedlearn report contributions RUN_DIR")
    return report_contributions(args, Path(args.runs[1]))


def report_contributions(args: argparse.Namespace, run_dir: Path) -> int:
    """The payout split of a run's contribution ledger."""
    from .contributions.payout import payout_csv, payout_split
    from .server.async_loop import DRIVER_STATE
    from .server.store import RunStore

    store = RunStore(run_dir, readonly=True)
    try:
        ledger, asynchronous = store.contribution_ledger(), store.get_meta(DRIVER_STATE) is not None
    finally:
        store.close()
    if not ledger and asynchronous:
        raise ConfigError(f"the run in {run_dir} is asynchronous (FedBuff), which keeps no contribution scores: the "
                          "updates of one server step were trained on different model versions and enter with "
                          "staleness weights, so no coalition of them has a value on one model to share out")
    if not ledger:
        raise ConfigError(f"the run in {run_dir} has no contribution scores; run with [contributions] "
                          "(e.g. `fedlearn simulate --contributions gtg,cosine`)")
    text = payout_csv(payout_split(ledger, args.method, args.budget))
    if args.out:
        args.out.write_text(text)
        print(f"payout split of {args.budget:g} by {args.method} written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard.server import serve_run

    serve_run(args.run_dir, port=args.port)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": cmd_audit, "report": cmd_report, "dashboard": cmd_dashboard,
}
