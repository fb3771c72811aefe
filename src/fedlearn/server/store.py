"""The run store: one SQLite database per run directory. Each completed round is one transaction holding
the global model, the strategy's state, metrics, participants and failures, so a restarted server resumes
from the last committed round and nothing half-written is ever read back."""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..serialize import decode_state, decode_tensors, encode_state, encode_tensors
from ..types import Failure, State

DB_NAME = "run.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    model BLOB NOT NULL,
    strategy_state BLOB NOT NULL,
    metrics TEXT NOT NULL,
    participants TEXT NOT NULL,
    failures TEXT NOT NULL,
    committed_at REAL NOT NULL
);
"""


@dataclass
class RoundRecord:
    """What one committed round left behind."""

    round: int
    metrics: dict[str, float]
    participants: list[str]
    failures: list[Failure] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0  # wall-clock time of the round (read back: the time since the previous commit)


class RunStore:
    """SQLite-backed record of a run. Round 0 holds the initial model. One thread at a time may use it, not
    necessarily the one that opened it (a deployment server opens it, then runs its rounds in another)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / DB_NAME
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def set_meta(self, key: str, value: Any) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def commit_round(
        self,
        rnd: int,
        state: State,
        strategy_state: dict[str, np.ndarray],
        metrics: dict[str, float],
        participants: list[str],
        failures: list[Failure],
    ) -> None:
        """Write one completed round atomically."""
        row = (
            rnd,
            encode_state(state),
            encode_tensors(strategy_state, {"kind": "strategy_state"}),
            json.dumps(metrics),
            json.dumps(participants),
            json.dumps([[f.client_id, f.kind, f.reason] for f in failures]),
            time.time(),
        )
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def last_round(self) -> int | None:
        """Number of the last committed round, or None for an empty store."""
        row = self._conn.execute("SELECT MAX(round) FROM rounds").fetchone()
        return row[0]

    def load_round(self, rnd: int) -> tuple[State, dict[str, np.ndarray]]:
        """Global model and strategy state as committed at the end of round `rnd`."""
        row = self._conn.execute("SELECT model, strategy_state FROM rounds WHERE round = ?", (rnd,)).fetchone()
        if row is None:
            raise KeyError(f"round {rnd} is not in the run store {self.path}")
        return decode_state(row[0]), dict(decode_tensors(row[1])[0])

    def history(self) -> list[RoundRecord]:
        """Every committed round after round 0, in order."""
        rows = self._conn.execute(
            "SELECT round, metrics, participants, failures, committed_at FROM rounds ORDER BY round"
        ).fetchall()
        return [
            RoundRecord(r, json.loads(m), json.loads(p), [Failure(*f) for f in json.loads(fl)],
                        seconds=max(0.0, at - previous[4]))
            for previous, (r, m, p, fl, at) in zip(rows, rows[1:])
        ]
