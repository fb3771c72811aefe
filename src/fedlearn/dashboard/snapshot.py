"""Everything the dashboard shows, read from a run store without writing to it: a JSON-ready snapshot of
rounds and their timing, metric curves, failures and flagged updates with reasons, privacy spent against
the budget, the contribution ledger and the audit log's state. Works on finished and running runs alike
(the store is opened read-only per snapshot, so the run's own writer is never blocked for long)."""
from __future__ import annotations

import math
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from ..audit.verify import verify_run
from ..server.async_loop import DRIVER_STATE
from ..server.store import RunStore

MAX_FAILURE_ROWS = 500  # newest first; a long run's full history stays in the store


class RunSnapshots:
    """Snapshots of the run in `run_dir`. The audit log is re-verified only when it has grown."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._audit: tuple[int | None, dict[str, Any]] = (-1, {})
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        waiting = {"run_dir": str(self.run_dir), "waiting": True, "rounds": []}
        if not (self.run_dir / "run.sqlite").exists():
            return waiting
        try:
            store = RunStore(self.run_dir, readonly=True)
        except sqlite3.OperationalError as exc:  # a store still being created has no tables yet
            return {**waiting, "note": str(exc)}
        try:
            if store.last_round() is None:
                return waiting
            snapshot = _read(store)
            last = store.last_round()
        except sqlite3.OperationalError as exc:  # a store still being created has no tables yet
            return {**waiting, "note": str(exc)}
        finally:
            store.close()
        snapshot["run_dir"] = str(self.run_dir)
        snapshot["audit"] = self._audit_state(last)
        return snapshot

    def _audit_state(self, last: int | None) -> dict[str, Any]:
        with self._lock:
            if self._audit[0] != last:
                result = verify_run(self.run_dir)
                head = result.head
                self._audit = (last, {"ok": result.ok, "size": result.size, "root": result.root,
                                      "public_key": result.public_key, "problems": result.problems[:20],
                                      "head_time": head.timestamp_ms / 1000 if head else None,
                                      "head_size": head.size if head else 0})
            return self._audit[1]


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _read(store: RunStore) -> dict[str, Any]:
    config = store.get_meta("config", {}) or {}
    history = store.history()
    times = store.commit_times()
    rounds, failures = [], []
    for record in history:
        start = times.get(record.round - 1)
        rounds.append({
            "round": record.round, "committed_at": times.get(record.round),
            "seconds": (times[record.round] - start) if start is not None and record.round in times else None,
            "metrics": {k: _finite(v) for k, v in record.metrics.items()},
            "participants": len(record.participants),
            "failed": bool(record.metrics.get("round_failed")),
        })
        failures += [{"round": record.round, "client": f.client_id, "kind": f.kind, "reason": f.reason}
                     for f in record.failures]
    per_client = Counter(f["client"] for f in failures)
    privacy = config.get("privacy", {}) if isinstance(config, dict) else {}
    budget = privacy.get("epsilon_budget") or privacy.get("target_epsilon")
    ledger = store.contribution_ledger()
    asynchronous = store.get_meta(DRIVER_STATE) is not None
    return {
        "mode": "asynchronous" if asynchronous else "synchronous",  # asynchronous: each "round" is a server step
        "contributions_note": ("asynchronous run (FedBuff): a server step's updates were trained on different model "
                               "versions, so no contribution scores are kept" if asynchronous else None),
        "run_id": store.get_meta("run_id", ""),
        "config": {k: config.get(k) for k in ("dataset", "strategy", "rounds", "num_clients", "clients_per_round",
                                              "aggregator", "attack") if isinstance(config, dict)},
        "total_rounds": config.get("rounds") if isinstance(config, dict) else None,
        # an asynchronous (FedBuff) run counts server steps, not rounds; its settings head the page
        "unit": "step" if isinstance(config, dict) and config.get("asynchronous") else "round",
        "asynchronous": (config.get("asynchronous") or None) if isinstance(config, dict) else None,
        "started_at": times.get(0),
        "rounds": rounds,
        "failures": failures[::-1][:MAX_FAILURE_ROWS],
        "failures_total": len(failures),
        "failures_by_client": per_client.most_common(50),
        "flagged_total": sum(f["kind"] == "flagged" for f in failures),
        "privacy": {"epsilon": [[r["round"], r["metrics"].get("dp_epsilon")] for r in rounds
                                if r["metrics"].get("dp_epsilon") is not None],
                    "budget": _finite(budget) if budget is not None else None,
                    "delta": privacy.get("dp_delta")},
        "contributions": sorted(
            ({"client": cid, **{m: {"total": t, "rounds": n} for m, (t, n) in methods.items()}}
             for cid, methods in ledger.items()),
            key=lambda row: -max((v["total"] for k, v in row.items() if k != "client"), default=0.0)),
    }
