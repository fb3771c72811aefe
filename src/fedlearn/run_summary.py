"""`fedlearn report RUN_DIR [RUN_DIR ...]`: what a finished or running run did, read from its store only:
its configuration, rounds, final and best metrics, failures by reason, flagged clients, privacy spent and
time. Several runs are shown side by side, one column each."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .server.anomaly import flag_counts
from .server.store import RunStore

_HEADLINE = tuple(f"{side}_{m}" for side in ("test", "fed") for m in ("accuracy", "balanced_accuracy", "auc", "f1", "loss")
                  ) + ("train_loss",)


def summarize(run_dir: str | Path) -> dict[str, str]:
    """Label -> printable value for one run directory, in display order."""
    if not Path(run_dir).exists():
        raise ValueError(f"the run directory {run_dir} does not exist")
    store = RunStore(run_dir, readonly=True)
    try:
        config = store.get_meta("config") or {}
        rounds = store.history()
    finally:
        store.close()
    planned = config.get("rounds")
    rows: dict[str, str] = {"run": str(run_dir)}
    app = config.get("app") or {}
    rows["task"] = f"app {app['factory']}" if app.get("factory") else (
        f"{config.get('dataset', '?')}, {config.get('strategy', '?')}" if "dataset" in config else "python api")
    asynchronous = config.get("asynchronous") or {}
    unit = "step" if asynchronous else "round"
    rows[f"{unit}s"] = f"{len(rounds)} of {planned}" if planned else str(len(rounds))
    if asynchronous:
        rows.update(async_rows(asynchronous, rounds))
    rows["time"] = f"{sum(r.seconds for r in rounds):.1f}s"
    last = rounds[-1].metrics if rounds else {}
    for name in _HEADLINE:
        values = [(r.metrics[name], r.round) for r in rounds if name in r.metrics]
        if not values:
            continue
        best, at = (min if name.endswith("loss") else max)(values)
        rows[f"final {name}"] = f"{last.get(name, float('nan')):.4f}"
        rows[f"best {name}"] = f"{best:.4f} ({unit} {at})"
    if "dp_epsilon" in last:
        rows["epsilon spent"] = f"{last['dp_epsilon']:.3f} over {int(last.get('dp_rounds', 0))} noised rounds"
    failures = Counter(f.kind for r in rounds for f in r.failures)
    rows["failures"] = ", ".join(f"{kind} {n}" for kind, n in failures.most_common()) or "none"
    if not asynchronous:
        rows["rounds failed"] = str(sum(1 for r in rounds if r.metrics.get("round_failed")))
    flagged = flag_counts(rounds).most_common(5)
    rows["flagged clients"] = ", ".join(f"{cid} ({n} rounds)" for cid, n in flagged) or "none"
    for key in ("aggregator", "attack", "backend") if asynchronous else (
            "clients_per_round", "fraction", "aggregator", "attack", "backend"):
        if config.get(key) not in (None, "", {}):
            rows[f"config {key}"] = str(config[key])
    for key, value in sorted((config.get("privacy") or {}).items()):
        rows[f"config privacy.{key}"] = str(value)
    return rows


def async_rows(settings: dict[str, Any], steps: list) -> dict[str, str]:
    """What an asynchronous (FedBuff) run adds: its settings, and per server step the staleness of the
    aggregated results, the stale results dropped and the clock (virtual time in simulation)."""
    rows = {"mode": "asynchronous (FedBuff): K = {} results per server step, {} clients at once, staleness {}{}".format(
        settings.get("buffer_size", "?"), settings.get("concurrency", "?"), settings.get("staleness", "sqrt"),
        f", max {settings['max_staleness']}" if settings.get("max_staleness") is not None else "")}
    used = sum(r.metrics.get("clients_used", 0) for r in steps)
    mean = sum(r.metrics.get("staleness_mean", 0) * r.metrics.get("clients_used", 0) for r in steps) / max(used, 1)
    rows["results aggregated"] = f"{used:.0f}, staleness mean {mean:.2f}, max " \
                                 f"{max((r.metrics.get('staleness_max', 0) for r in steps), default=0):.0f}"
    rows["stale results dropped"] = f"{sum(r.metrics.get('clients_stale', 0) for r in steps):.0f}"
    if steps and "clock" in steps[-1].metrics:
        rows["clock at last step"] = f"{steps[-1].metrics['clock']:.1f}s"
    return rows


def format_reports(runs: list[dict[str, str]]) -> str:
    """One table: a row per label, a column per run (a dash where a run lacks the row)."""
    labels: list[str] = []
    for run in runs:
        labels += [label for label in run if label not in labels]
    width = max(len(label) for label in labels)
    columns = [max(len(run.get(label, "-")) for label in labels) for run in runs]
    lines = []
    for label in labels:
        cells = [run.get(label, "-").ljust(w) for run, w in zip(runs, columns)]
        lines.append(f"{label.ljust(width)}  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def report_text(run_dirs: list[Any]) -> str:
    """The report of one run, or several side by side."""
    return format_reports([summarize(d) for d in run_dirs])
