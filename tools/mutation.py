"""Mutation testing for fedlearn: plant one realistic bug at a time in a scratch copy of the repository and
check that the tests that cover that file fail.

    python tools/mutation.py                          # every area, all mutants (hours on 2 cores)
    python tools/mutation.py --fraction 0.15          # a seeded sample of about 15% of the mutants
    python tools/mutation.py --area privacy --area strategies
    python tools/mutation.py --file src/fedlearn/serialize.py --list   # only list the mutants
    python tools/mutation.py --rerun-survivors mutation-report.json    # after adding tests

Mutants are generated from the syntax tree of each file: arithmetic and comparison operators swapped
(``+``/``-``, ``*``/``/``, ``<``/``<=``, ``==``/``!=``, ``in``/``not in``, ``and``/``or``), ``not`` and unary
minus dropped, numbers changed (n -> n + 1, x -> 2x), ``True``/``False`` flipped, ``min``/``max`` and
``any``/``all`` swapped, guards dropped (``if cond:`` -> ``if False:``) and call statements deleted. Docstrings,
log calls, error messages, f-strings and annotations are left alone. A mutant is *killed* when its tests fail or
time out. Sampling (``--fraction``) keeps a mutant when a hash of (seed, mutant id) falls below the fraction, so
the sample of one file does not change when other files change, and a subset of files can be re-run alone.

Mutant ids are ``file:function:operator#n`` (the n-th such mutation in that function), stable under edits
elsewhere in the file. Surviving mutants judged equivalent (no test could tell them apart from the original)
are listed with the reason in ``tools/mutation_equivalent.txt`` and left out of the score.
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.txt"

AREAS = {
    "strategies": "src/fedlearn/strategies/*.py",
    "privacy": "src/fedlearn/privacy/*.py",
    "secagg": "src/fedlearn/secagg/*.py",
    "serialize": "src/fedlearn/serialize.py",
    "server": "src/fedlearn/server/*.py",
    "transport": "src/fedlearn/transport/*.py",
}
SKIP_FILES = ("*/__init__.py", "*_pb2.py")

# Which tests run against a mutant of a file: the first pattern that matches gives the test files and a -k
# expression. Unit-level tests come first (with -x a killed mutant stops at its first failing test); tests that
# train to an accuracy or wait on timeouts are left to CI (SLOW), so that a mutant costs seconds, not minutes.
SLOW = ("fedprox_beats or reaches_93 or converges_with_30 or tracks_the_target_quantile or simulate_accounts "
        "or killed_run_resumes or fuzz_mutated or noise_helper or fedadam_selected or heart_disease")
PROCESS_TESTS = ["tests/test_transport_security.py", "tests/test_error_messages.py"]
TESTS: list[tuple[str, list[str], str]] = [
    ("src/fedlearn/strategies/*", ["tests/test_strategy_settings.py", "tests/test_strategies_opt.py",
                                   "tests/test_round_loop.py", "tests/test_crash_consistency.py"],
     "not anomaly and not sampler and not poisson and not statistics and not pass and not threshold"),
    ("src/fedlearn/privacy/dpsgd.py", ["tests/test_privacy.py"], "dpsgd"),
    ("src/fedlearn/privacy/*", ["tests/test_dp_calibration.py", "tests/test_privacy.py"], "not dpsgd"),
    ("src/fedlearn/secagg/*", ["tests/test_secagg.py", "tests/test_secagg_malicious.py"], ""),
    ("src/fedlearn/serialize.py", ["tests/test_serialize.py", "tests/test_wire_binding.py",
                                   "tests/test_transport_wire.py", "tests/test_strategies_opt.py"],
     "not nonce and not signed_payload and (serial or dtype or decode or update or round_trip or wire or header "
     "or corrupt or truncat or magic or layout or mutation or bytes or extras or kinds or arrays)"),
    ("src/fedlearn/server/anomaly.py", ["tests/test_anomaly.py", "tests/test_strategy_settings.py"],
     "anomaly or min_updates or pass or threshold or flag or crowd or outlier"),
    ("src/fedlearn/server/sampling.py", ["tests/test_strategy_settings.py", "tests/test_round_loop.py"], ""),
    ("src/fedlearn/server/async_loop.py", ["tests/test_async.py"], ""),
    ("src/fedlearn/server/store.py", ["tests/test_server_edges.py", "tests/test_crash_consistency.py", "tests/test_strategies_opt.py",
                                      "tests/test_cli_and_store.py", "tests/test_privacy.py"],
     "killed or store or resume or budget or round_zero"),
    ("src/fedlearn/server/*", ["tests/test_server_edges.py", "tests/test_round_loop.py", "tests/test_strategy_settings.py", "tests/test_anomaly.py",
                               "tests/test_privacy.py", "tests/test_crash_consistency.py", "tests/test_secagg.py",
                               "tests/test_strategies_opt.py"], ""),
    ("src/fedlearn/transport/wire.py", ["tests/test_transport_wire.py", "tests/test_wire_binding.py",
                                        "tests/test_transport_security.py"], ""),
    ("src/fedlearn/transport/identity.py", ["tests/test_transport_wire.py", "tests/test_wire_binding.py",
                                            "tests/test_transport_security.py"], "not fuzz"),
    ("src/fedlearn/transport/secagg_handlers.py", ["tests/test_transport_secagg.py"], ""),
    ("src/fedlearn/transport/certs.py", ["tests/test_file_modes.py", "tests/test_transport_security.py",
                                        "tests/test_wire_binding.py"], ""),
    ("src/fedlearn/transport/commands.py", ["tests/test_error_messages.py", "tests/test_file_modes.py"], ""),
    ("src/fedlearn/transport/client_process.py", PROCESS_TESTS, ""),
    ("src/fedlearn/transport/server_process.py", PROCESS_TESTS, ""),
    ("src/fedlearn/transport/client_factory.py", ["tests/test_transport_processes.py"], "five_client"),
    ("src/fedlearn/transport/*", ["tests/test_transport_security.py", "tests/test_wire_binding.py"], ""),
]

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
              ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr, ast.BitXor: ast.BitOr}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_NAME = {"min": "max", "max": "min", "any": "all", "all": "any"}
LOGGERS = {"log", "logger", "logging", "warnings", "print"}


@dataclass
class Mutant:
    id: str
    file: str
    line: int
    operator: str
    original: str  # the source line before and after, for the report
    mutated: str
    area: str
    status: str = "pending"  # killed, survived, timeout, equivalent
    seconds: float = 0.0


@dataclass
class _Site:
    index: int  # position of the node in ast.walk order
    operator: str
    apply: object = field(repr=False)  # callable(node) -> replacement node (or None to delete a statement)


def _is_logging_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    while isinstance(f, ast.Attribute):
        f = f.value
    return isinstance(f, ast.Name) and f.id in LOGGERS


def _protected(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, log calls, raise arguments, f-strings, annotations, __all__."""
    skip: set[int] = set()

    def cover(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            cover(body[0])
        if _is_logging_call(node):
            cover(node)
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc
            if isinstance(exc, ast.Call):
                for arg in [*exc.args, *[k.value for k in exc.keywords]]:
                    cover(arg)
        if isinstance(node, ast.JoinedStr):
            cover(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            cover(node.returns)
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg, node.args.kwarg]:
                if a is not None:
                    cover(a.annotation)
        if isinstance(node, ast.AnnAssign):
            cover(node.annotation)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            cover(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            cover(node)
    return skip


def _sites(tree: ast.Module) -> list[_Site]:
    skip = _protected(tree)
    sites = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP_BINOP:
            new = SWAP_BINOP[type(node.op)]
            sites.append(_Site(index, f"{type(node.op).__name__}->{new.__name__}",
                               lambda n, new=new: _replace(n, op=new())))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAP_CMP:
                    new = SWAP_CMP[type(op)]
                    sites.append(_Site(index, f"{type(op).__name__}->{new.__name__}",
                                       lambda n, k=k, new=new: _replace(n, ops=[*n.ops[:k], new(), *n.ops[k + 1:]])))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            sites.append(_Site(index, f"{type(node.op).__name__}->{new.__name__}", lambda n, new=new: _replace(n, op=new())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            sites.append(_Site(index, f"drop-{type(node.op).__name__}", lambda n: n.operand))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            value = node.value
            if isinstance(value, bool):
                new_value = not value
            elif isinstance(value, int):
                new_value = value + 1
            else:
                new_value = value * 2 if value != 0 else 1.0
            sites.append(_Site(index, f"const {value!r}->{new_value!r}", lambda n, v=new_value: ast.Constant(v)))
        elif isinstance(node, ast.Name) and node.id in SWAP_NAME and isinstance(node.ctx, ast.Load):
            sites.append(_Site(index, f"{node.id}->{SWAP_NAME[node.id]}",
                               lambda n: ast.Name(SWAP_NAME[n.id], ast.Load())))
        elif isinstance(node, ast.If):
            sites.append(_Site(index, "drop-guard", lambda n: _replace(n, test=ast.Constant(False))))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not _is_logging_call(node.value):
            sites.append(_Site(index, "drop-call", lambda n: ast.Pass()))
    return sites


def _replace(node: ast.AST, **changes) -> ast.AST:
    new = copy.copy(node)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def _scopes(tree: ast.Module) -> dict[int, str]:
    """ast.walk index -> qualified name of the innermost function or class around it."""
    names: dict[int, str] = {}
    order = {id(n): i for i, n in enumerate(ast.walk(tree))}

    def visit(node: ast.AST, scope: str) -> None:
        names[order[id(node)]] = scope
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            visit(child, inner)

    visit(tree, "")
    return names


def mutate_source(tree: ast.Module, site: _Site) -> str:
    """The module's source with one site mutated."""
    tree = copy.deepcopy(tree)
    nodes = list(ast.walk(tree))
    target = nodes[site.index]
    replacement = site.apply(target)
    for parent in nodes:
        for name, value in ast.iter_fields(parent):
            if value is target:
                setattr(parent, name, replacement)
                return ast.unparse(ast.fix_missing_locations(tree))
            if isinstance(value, list) and any(v is target for v in value):
                setattr(parent, name, [replacement if v is target else v for v in value])
                return ast.unparse(ast.fix_missing_locations(tree))
    raise RuntimeError("mutation site not found")


def area_of(path: str) -> str | None:
    for area, pattern in AREAS.items():
        if fnmatch(path, pattern):
            return area
    return None


def tests_for(path: str) -> list[str]:
    """pytest arguments for the tests that run against mutants of `path`."""
    for pattern, files, keyword in TESTS:
        if fnmatch(path, pattern):
            return [*files, "-k", f"({keyword}) and not ({SLOW})" if keyword else f"not ({SLOW})"]
    raise SystemExit(f"no tests mapped for {path}; add it to TESTS in tools/mutation.py")


def generate(paths: list[str]) -> list[tuple[Mutant, str]]:
    """Every mutant of `paths`, with its mutated source."""
    out = []
    for path in paths:
        source = (ROOT / path).read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        scopes = _scopes(tree)
        seen: Counter[str] = Counter()
        nodes = list(ast.walk(tree))
        for site in _sites(tree):
            scope = scopes.get(site.index, "") or "<module>"
            key = f"{path.removeprefix('src/fedlearn/')}:{scope}:{site.operator}"
            mutant_id = f"{key}#{seen[key]}"
            seen[key] += 1
            node = nodes[site.index]
            line = getattr(node, "lineno", 0)
            try:
                mutated_source = mutate_source(tree, site)
            except (RuntimeError, ValueError):
                continue
            original_line = lines[line - 1].strip() if line else ""
            after = ast.unparse(site.apply(copy.deepcopy(node))) if not isinstance(node, (ast.If, ast.Expr)) else (
                "if False:" if site.operator == "drop-guard" else "pass")
            out.append((Mutant(mutant_id, path, line, site.operator, original_line, after[:120], area_of(path) or "?"),
                        mutated_source))
    return out


def sampled(mutant_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{mutant_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def load_equivalent() -> dict[str, str]:
    if not EQUIVALENT_FILE.exists():
        return {}
    entries = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            mutant_id, _, reason = line.partition(" | ")
            entries[mutant_id.strip()] = reason.strip()
    return entries


class Runner:
    """Runs mutants on `jobs` scratch copies of the repository, one mutant at a time per copy."""

    def __init__(self, jobs: int, timeout_factor: float, python: str) -> None:
        self.python = python
        self.copies: list[Path] = []
        self.free: list[Path] = []
        self.lock = threading.Lock()
        self.timeout_factor = timeout_factor
        self.baseline: dict[tuple[str, ...], float] = {}
        self.base = Path(tempfile.mkdtemp(prefix="fedlearn-mutation-"))
        for k in range(jobs):
            copy_dir = self.base / f"copy{k}"
            shutil.copytree(ROOT / "src", copy_dir / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            shutil.copytree(ROOT / "tests", copy_dir / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(ROOT / "pyproject.toml", copy_dir / "pyproject.toml")
            if (ROOT / "README.md").exists():
                shutil.copy(ROOT / "README.md", copy_dir / "README.md")
            self.copies.append(copy_dir)
        self.free = list(self.copies)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def _pytest(self, copy_dir: Path, args: list[str], timeout: float) -> tuple[int | None, float]:
        env = {**os.environ, "PYTHONPATH": str(copy_dir / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        command = [self.python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=copy_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
        return rc, time.monotonic() - start

    def check_baseline(self, args: tuple[str, ...]) -> float:
        """Run one test selection on the unmutated copy; it must pass. Its time sets the mutants' timeout."""
        with self.lock:
            copy_dir = self.free.pop()
        try:
            rc, seconds = self._pytest(copy_dir, list(args), 1800)
        finally:
            with self.lock:
                self.free.append(copy_dir)
        if rc != 0:
            raise SystemExit(f"the unmutated tests fail (exit {rc}): pytest {' '.join(args)}")
        self.baseline[args] = seconds
        return seconds

    def run(self, mutant: Mutant, source: str) -> Mutant:
        args = tests_for(mutant.file)
        timeout = self.baseline[tuple(args)] * (self.timeout_factor or 1.0) + 30
        with self.lock:
            copy_dir = self.free.pop()
        target = copy_dir / mutant.file
        original = target.read_text()
        try:
            target.write_text(source)
            rc, mutant.seconds = self._pytest(copy_dir, args, timeout)
        finally:
            target.write_text(original)
            with self.lock:
                self.free.append(copy_dir)
        mutant.status = "timeout" if rc is None else "survived" if rc == 0 else "killed"
        return mutant


def report(mutants: list[Mutant], equivalent: dict[str, str]) -> str:
    rows = defaultdict(Counter)
    for m in mutants:
        rows[m.area][m.status] += 1
    lines = [f"{'area':<12}{'mutants':>8}{'killed':>8}{'timeout':>8}{'equiv.':>8}{'survived':>9}{'score':>8}"]
    total = Counter()
    for area in sorted(rows):
        c = rows[area]
        total.update(c)
        lines.append(_row(area, c))
    lines.append(_row("all", total))
    survivors = [m for m in mutants if m.status == "survived"]
    if survivors:
        lines.append("\nsurvivors (not judged equivalent):")
        lines += [f"  {m.id}  line {m.line}: {m.original}  ->  {m.mutated}" for m in survivors]
    eq = [m for m in mutants if m.status == "equivalent"]
    if eq:
        lines.append("\nequivalent survivors:")
        lines += [f"  {m.id}: {equivalent[m.id]}" for m in eq]
    return "\n".join(lines)


def _row(name: str, c: Counter) -> str:
    n = sum(c.values())
    caught = c["killed"] + c["timeout"]
    scored = n - c["equivalent"]
    score = f"{100 * caught / scored:.1f}%" if scored else "-"
    return f"{name:<12}{n:>8}{c['killed']:>8}{c['timeout']:>8}{c['equivalent']:>8}{c['survived']:>9}{score:>8}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", action="append", choices=sorted(AREAS), help="areas to mutate (default: all)")
    parser.add_argument("--file", action="append", help="source files to mutate (paths from the repository root)")
    parser.add_argument("--fraction", type=float, default=1.0, help="seeded sample of the mutants (0-1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once, each on its own scratch copy")
    parser.add_argument("--timeout-factor", type=float, default=2.0, help="timeout = factor * clean time + 30 s")
    parser.add_argument("--timeout", type=float, help="fixed timeout per mutant in seconds; skips the clean runs")
    parser.add_argument("--rerun-survivors", metavar="REPORT", help="run only the survivors of an earlier --json report")
    parser.add_argument("--id", action="append", help="run only these mutant ids")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", metavar="PATH", help="write every mutant's result here")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)

    if args.file:
        paths = [str(Path(f).resolve().relative_to(ROOT)) for f in args.file]
    else:
        paths = sorted(str(p.relative_to(ROOT)) for area in (args.area or AREAS) for p in ROOT.glob(AREAS[area]))
    paths = [p for p in paths if not any(fnmatch(p, s) for s in SKIP_FILES)]
    candidates = generate(paths)
    wanted = set(args.id or [])
    if args.rerun_survivors:
        wanted |= {m["id"] for m in json.loads(Path(args.rerun_survivors).read_text()) if m["status"] == "survived"}
    if wanted:
        candidates = [(m, s) for m, s in candidates if m.id in wanted]
    else:
        candidates = [(m, s) for m, s in candidates if sampled(m.id, args.seed, args.fraction)]
    if args.list:
        for m, _ in candidates:
            print(f"{m.id}  line {m.line}: {m.original}  ->  {m.mutated}")
        print(f"{len(candidates)} mutants")
        return 0

    equivalent = load_equivalent()
    runner = Runner(args.jobs, args.timeout_factor, args.python)
    done: list[Mutant] = []
    try:
        selections = sorted({tuple(tests_for(m.file)) for m, _ in candidates})
        if args.timeout:  # trust that the unmutated tests pass (e.g. re-running survivors): fixed timeout
            runner.timeout_factor = 0.0
            runner.baseline = {test_args: args.timeout - 30 for test_args in selections}
        with ThreadPoolExecutor(args.jobs) as pool:
            for test_args, seconds in zip(selections, pool.map(runner.check_baseline, [] if args.timeout else selections)):
                print(f"baseline {seconds:6.1f}s  pytest {' '.join(test_args)}", flush=True)
        start = time.monotonic()
        pool = ThreadPoolExecutor(args.jobs)
        futures = [pool.submit(runner.run, m, source) for m, source in candidates]
        try:
            for k, future in enumerate(as_completed(futures), 1):
                m = future.result()
                if m.status == "survived" and m.id in equivalent:
                    m.status = "equivalent"
                done.append(m)
                print(f"[{k}/{len(candidates)} {time.monotonic() - start:6.0f}s] {m.status:<10} {m.id}  "
                      f"line {m.line}: {m.original[:60]}  ->  {m.mutated[:60]}", flush=True)
                if args.json:  # after every mutant, so an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps([asdict(d) for d in done], indent=1))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        runner.close()
    print()
    print(report(done, equivalent))
    stale = sorted(set(equivalent) - {m.id for m, _ in generate(paths)}) if not wanted and args.fraction >= 1 else []
    if stale:
        print("\nequivalent-list entries that no longer match a mutant:", *stale, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
