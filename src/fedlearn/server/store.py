"""The run store: one SQLite database per run directory. Each completed round is one transaction holding
the global model, the strategy's state, metrics, participants, failures and (for a failed round) the reason,
the round's audit record and signed tree head (`fedlearn.audit`), and its contribution scores, so a
restarted server resumes from the last committed round and nothing half-written is ever read back.

A run directory belongs to one configuration, stored with the first round (`bind_config`): starting another
configuration in it is refused with the settings that differ, and resuming may raise only `rounds`."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audit.log import KEY_FILE, PUBLIC_KEY_FILE, SCHEMA as AUDIT_SCHEMA, AuditLog, canonical, load_or_create_key, public_hex
from ..audit.record import digest, round_record
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
    committed_at REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS contributions (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, method TEXT NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (round, client_id, method)
);
CREATE TABLE IF NOT EXISTS contribution_ledger (
    client_id TEXT NOT NULL, method TEXT NOT NULL, total REAL NOT NULL, rounds INTEGER NOT NULL,
    PRIMARY KEY (client_id, method)
);
""" + AUDIT_SCHEMA


@dataclass
class RoundRecord:
    """What one committed round left behind."""

    round: int
    metrics: dict[str, float]
    participants: list[str]
    failures: list[Failure] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0  # wall-clock time of the round (read back: the time since the previous commit)


def _owner_only(path: Path) -> None:
    """Create `path` (or keep it) with mode 0600, never through a symlink; SQLite gives its WAL and shared
    memory files the database's mode, so they are 0600 too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@dataclass
class RoundEvidence:
    """What the round loop knows about a round beyond its model and metrics, for the audit record and the
    contribution ledger: the hash of each accepted update, and each client's contribution scores."""

    update_hashes: dict[str, str] = field(default_factory=dict)
    contributions: dict[str, dict[str, float]] = field(default_factory=dict)


class RunDirConflict(ValueError):
    """A run directory holds a run of another configuration; the message names the settings that differ."""


def config_changes(stored: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(setting, stored value, new value) for every setting that differs; nested tables as dotted names."""
    if isinstance(stored, dict) and isinstance(new, dict):
        return [change for key in sorted(set(stored) | set(new), key=str)
                for change in config_changes(stored.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if stored == new else [(prefix.rstrip("."), stored, new)]


class RunStore:
    """SQLite-backed record of a run. Round 0 holds the initial model. One thread at a time may use it, not
    necessarily the one that opened it (a deployment server opens it, then runs its rounds in another).

    `readonly` opens an existing store without writing anything (dashboards, `fedlearn audit verify`), also
    while another process is running the rounds. `audit_key` is the Ed25519 key that signs tree heads
    (default: one made for the run in the run directory)."""

    def __init__(self, run_dir: str | Path, *, readonly: bool = False, audit_key: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DB_NAME
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.run_dir} holds no run store ({DB_NAME})")
            self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self.audit = AuditLog(self._conn, self.get_meta("run_id", ""))
            return
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new run directory is its owner's only
        _owner_only(self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(rounds)")}
        if "note" not in columns:  # a store written before failed rounds kept their reason
            with self._conn:
                self._conn.execute("ALTER TABLE rounds ADD COLUMN note TEXT NOT NULL DEFAULT ''")
        if self.get_meta("run_id") is None:
            self.set_meta("run_id", uuid.uuid4().hex)
        key = load_or_create_key(Path(audit_key) if audit_key else self.run_dir / KEY_FILE)
        if self.get_meta("audit_public_key") not in (None, public_hex(key)):
            raise ValueError(f"the audit key {audit_key or self.run_dir / KEY_FILE} is not the key this run's "
                             f"audit log was signed with ({self.get_meta('audit_public_key')})")
        self.set_meta("audit_public_key", public_hex(key))
        (self.run_dir / PUBLIC_KEY_FILE).write_text(public_hex(key) + "\n")
        self.audit = AuditLog(self._conn, self.get_meta("run_id"), key)

    @property
    def run_id(self) -> str:
        return self.get_meta("run_id", "")

    def close(self) -> None:
        self._conn.close()

    def set_meta(self, key: str, value: Any) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def bind_config(self, config: dict[str, Any], *, resume: bool = False) -> None:
        """Claim this run directory for `config`, or check it is the configuration already stored here.

        Any difference is refused with `RunDirConflict` naming it, except a higher `rounds` when `resume`
        (continuing the stored run for more rounds), which is then stored."""
        config = json.loads(json.dumps(config))  # as it reads back: tuples become lists
        stored = self.get_meta("config")
        if stored is None:
            self.set_meta("config", config)
            return
        changes = config_changes(stored, config)
        others = [c for c in changes if c[0] != "rounds"]
        if others or (changes and not resume):
            listed = ", ".join(f"{name} (stored {_show(old)}, given {_show(new)})" for name, old, new in changes[:8])
            how = ("resume a run, change nothing but rounds" if resume else
                   f"run this configuration, use a new run directory; to continue the stored run, --resume "
                   f"{self.run_dir} (which may raise only rounds)")
            raise RunDirConflict(f"run directory {self.run_dir} belongs to another configuration; it differs in "
                                 f"{listed}. To {how}.")
        if changes:
            done = self.last_round() or 0
            if not isinstance(config.get("rounds"), int) or config["rounds"] < done:
                raise RunDirConflict(f"cannot resume {self.run_dir} with rounds = {config.get('rounds')!r}: "
                                     f"{done} rounds are already committed")
            self.set_meta("config", config)

    def commit_round(
        self,
        rnd: int,
        state: State,
        strategy_state: dict[str, np.ndarray],
        metrics: dict[str, float],
        participants: list[str],
        failures: list[Failure],
        note: str = "",
        *,
        meta: dict[str, Any] | None = None,
        evidence: RoundEvidence | None = None,
    ) -> None:
        """Write one completed round atomically, with its audit record, signed tree head and contributions;
        `note` says why a failed round left the model unchanged, and `meta` holds entries a driver must resume
        from (see `set_meta`), written in the same transaction."""
        evidence = evidence or RoundEvidence()
        model = encode_state(state)
        row = (
            rnd,
            model,
            encode_tensors(strategy_state, {"kind": "strategy_state"}),
            json.dumps(metrics),
            json.dumps(participants),
            json.dumps([[f.client_id, f.kind, f.reason] for f in failures]),
            time.time(),
            note,
        )
        epsilon = metrics.get("dp_epsilon")
        try:
            with self._conn:
                self._conn.execute("INSERT OR REPLACE INTO rounds (round, model, strategy_state, metrics, participants, "
                                   "failures, committed_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                for key, value in (meta or {}).items():
                    self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
                last = self._conn.execute("SELECT record FROM audit_leaves ORDER BY idx DESC LIMIT 1").fetchone()
                self.audit.append(rnd, round_record(
                    log_id=self.audit.log_id, rnd=rnd, model_before=json.loads(last[0])["model_after"] if last else None,
                    model_after=digest(model), config=digest(canonical(self.get_meta("config", {}))),
                    accepted={cid: evidence.update_hashes.get(cid, "") for cid in participants}, failures=failures,
                    epsilon=float(epsilon) if epsilon is not None and math.isfinite(epsilon) else None,
                    version=_version(), contributions=evidence.contributions))
                for cid, scores in evidence.contributions.items():
                    for method, score in scores.items():
                        self._conn.execute("INSERT OR REPLACE INTO contributions VALUES (?, ?, ?, ?)",
                                           (rnd, cid, method, float(score)))
                        self._conn.execute(
                            "INSERT INTO contribution_ledger VALUES (?, ?, ?, 1) ON CONFLICT (client_id, method) "
                            "DO UPDATE SET total = total + excluded.total, rounds = rounds + 1",
                            (cid, method, float(score)))
        except BaseException:
            self.audit.forget_cache()
            raise

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

    def committed(self) -> Iterator[tuple[int, bytes, list[str]]]:
        """(round, encoded model, participants) of every committed round, round 0 included, in order; one
        row at a time, so a long run of a large model is never all in memory."""
        for r, m, p in self._conn.execute("SELECT round, model, participants FROM rounds ORDER BY round"):
            yield r, bytes(m), json.loads(p)

    def contribution_ledger(self) -> dict[str, dict[str, tuple[float, int]]]:
        """Cumulative contributions: client -> method -> (sum of round scores, rounds scored)."""
        ledger: dict[str, dict[str, tuple[float, int]]] = {}
        for cid, method, total, rounds in self._conn.execute(
                "SELECT client_id, method, total, rounds FROM contribution_ledger ORDER BY client_id, method"):
            ledger.setdefault(cid, {})[method] = (total, rounds)
        return ledger

    def round_contributions(self) -> list[tuple[int, str, str, float]]:
        """Every (round, client, method, score), in round order."""
        return self._conn.execute(
            "SELECT round, client_id, method, score FROM contributions ORDER BY round, client_id, method").fetchall()

    def commit_times(self) -> dict[int, float]:
        """Round -> wall-clock time of its commit (seconds since the epoch)."""
        return dict(self._conn.execute("SELECT round, committed_at FROM rounds ORDER BY round").fetchall())

    def history(self) -> list[RoundRecord]:
        """Every committed round after round 0, in order."""
        rows = self._conn.execute(
            "SELECT round, metrics, participants, failures, note, committed_at FROM rounds ORDER BY round"
        ).fetchall()
        return [
            RoundRecord(r, json.loads(m), json.loads(p), [Failure(*f) for f in json.loads(fl)], note,
                        seconds=max(0.0, at - previous[5]))
            for previous, (r, m, p, fl, note, at) in zip(rows, rows[1:])
        ]


def stored_config(run_dir: str | Path) -> dict[str, Any]:
    """The configuration of the run stored in `run_dir` (to resume it); `ValueError` if there is none."""
    if not Path(run_dir).exists():
        raise ValueError(f"cannot resume: the run directory {run_dir} does not exist")
    if not (Path(run_dir) / DB_NAME).exists():
        raise ValueError(f"cannot resume: {run_dir} holds no run store ({DB_NAME})")
    store = RunStore(run_dir)
    try:
        config = store.get_meta("config")
    finally:
        store.close()
    if config is None:
        raise ValueError(f"cannot resume: {run_dir} stores no configuration; start it again with its settings")
    return config


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def _version() -> str:
    from .. import __version__  # the package imports this module, so look the version up when it is needed

    return __version__
