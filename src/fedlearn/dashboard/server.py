"""The dashboard's web server: the page and its assets from the package (no CDN, works offline), one
JSON endpoint, `/api/state`, that the page polls for live updates, and `/metrics` (the same numbers in the
Prometheus text format, for scraping). Stdlib `http.server`, one thread per
request, listening on 127.0.0.1 unless told otherwise.

With an operator token every request for data must carry it (`Authorization: Bearer TOKEN`); the page
takes it once from its address (`/?token=...`) and sends it with each poll. `authorized` is the one place
that decides.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .snapshot import RunSnapshots

log = logging.getLogger(__name__)
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


def authorized(header: str | None, token_digest: str | None) -> bool:
    """True when no token is required, or `header` is `Bearer <token>` with the token's SHA-256 equal to
    `token_digest` (compared in constant time; the server holds only the digest, as for `fedlearn status`)."""
    if token_digest is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    presented = hashlib.sha256(given.strip().encode()).hexdigest()
    return scheme == "Bearer" and hmac.compare_digest(presented.encode(), token_digest.encode())


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class Dashboard:
    """Serves `source()` (a JSON-ready dict) and the page. `start()` returns the port; `stop()` ends."""

    def __init__(self, source: Callable[[], dict[str, Any]], *, host: str = "127.0.0.1", port: int = 0,
                 token_digest: str | None = None) -> None:
        self.source, self.token_digest = source, token_digest
        handler = self._handler()
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> int:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fedlearn-dashboard", daemon=True)
        self._thread.start()
        return self.port

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = urlsplit(self.path).path
                if path in ASSETS:
                    name, kind = ASSETS[path]
                    self._send(200, _asset(name), kind)
                elif path in ("/api/state", "/metrics"):
                    if not authorized(self.headers.get("Authorization"), dashboard.token_digest):
                        self._send(401, b'{"error": "operator token required"}', "application/json")
                        return
                    try:
                        state = dashboard.source()
                        if path == "/metrics":
                            self._send(200, prometheus_text(state).encode(), "text/plain; version=0.0.4")
                            return
                        body = json.dumps(state, allow_nan=False).encode()
                    except Exception as exc:  # a half-written run must not take the dashboard down
                        log.warning("dashboard snapshot failed: %s", exc)
                        body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy", "default-src 'self'")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("dashboard: " + format, *args)

        return Handler


def prometheus_text(state: dict[str, Any]) -> str:
    """The snapshot's headline numbers in the Prometheus text format, for operators who scrape."""
    rounds = state.get("rounds") or []
    last = rounds[-1] if rounds else {"round": 0, "metrics": {}}
    epsilon = (state.get("privacy") or {}).get("epsilon") or []
    audit = state.get("audit") or {}
    values = {
        "fedlearn_round": last["round"],
        "fedlearn_failures_total": state.get("failures_total", 0),
        "fedlearn_flagged_total": state.get("flagged_total", 0),
        "fedlearn_audit_log_size": audit.get("size", 0),
        "fedlearn_audit_log_verified": int(bool(audit.get("ok"))),
        **({"fedlearn_epsilon": epsilon[-1][1]} if epsilon else {}),
        **{f"fedlearn_{k}": v for k, v in last["metrics"].items()
           if k in ("test_accuracy", "test_loss", "train_loss", "fed_accuracy", "fed_loss") and v is not None},
    }
    if state.get("live"):
        values["fedlearn_connected_clients"] = len(state["live"].get("connected_clients") or [])
        values["fedlearn_rejected_results_total"] = state["live"].get("rejected_results", 0)
    return "".join(f"{name} {float(value):g}\n" for name, value in values.items())


def serve_run(run_dir: str | Path, *, port: int = 8050, host: str = "127.0.0.1") -> None:
    """`fedlearn dashboard RUN_DIR`: serve the run's dashboard until interrupted."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    dashboard = Dashboard(RunSnapshots(run_dir), host=host, port=port)
    print(f"dashboard of {run_dir}: http://{host}:{dashboard.port}/  (Ctrl-C to stop)", flush=True)
    try:
        dashboard.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()
