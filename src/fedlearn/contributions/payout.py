"""From the cumulative contribution ledger to a payout split a consortium could pay from.

Each client's share is its cumulative score over the sum of all positive cumulative scores; a client
whose total is zero or negative (a free rider, or one that hurt the model) gets nothing. Amounts are
rounded to cents with the largest-remainder rule, so they add up to the budget exactly.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Payout:
    client_id: str
    rounds: int
    score: float
    share: float
    amount: float


def payout_split(ledger: dict[str, dict[str, tuple[float, int]]], method: str, budget: float) -> list[Payout]:
    """Split `budget` by the cumulative `method` scores of `ledger` (client -> method -> (total, rounds))."""
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a non-negative number, got {budget}")
    scored = {cid: methods[method] for cid, methods in ledger.items() if method in methods}
    if not scored:
        methods = sorted({m for methods in ledger.values() for m in methods})
        raise ValueError(f"the ledger has no {method!r} scores; it has: {', '.join(methods) or 'none'}")
    positive = sum(max(total, 0.0) for total, _ in scored.values())
    shares = {cid: (max(total, 0.0) / positive if positive > 0 else 0.0) for cid, (total, _) in scored.items()}
    cents = round(budget * 100)
    raw = {cid: share * cents for cid, share in shares.items()}
    floor = {cid: math.floor(v) for cid, v in raw.items()}
    leftover = cents - sum(floor.values()) if positive > 0 else 0
    for cid in sorted(raw, key=lambda c: (floor[c] - raw[c], c))[:leftover]:
        floor[cid] += 1
    rows = [Payout(cid, scored[cid][1], scored[cid][0], shares[cid], floor[cid] / 100) for cid in scored]
    return sorted(rows, key=lambda p: (-p.score, p.client_id))


def payout_csv(rows: list[Payout]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["client_id", "rounds_scored", "cumulative_score", "share", "payout"])
    for p in rows:
        writer.writerow([p.client_id, p.rounds, f"{p.score:.6g}", f"{p.share:.6f}", f"{p.amount:.2f}"])
    return out.getvalue()
