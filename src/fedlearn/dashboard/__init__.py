"""A live, read-only dashboard of a run: `fedlearn dashboard RUN_DIR`, or the deployment server's own."""
from .server import Dashboard, authorized, serve_run
from .snapshot import RunSnapshots

__all__ = ["Dashboard", "RunSnapshots", "authorized", "serve_run"]
