"""Per-client state on disk: personal heads, Ditto models, anything a client keeps between rounds.

A simulation of thousands of clients cannot keep every client's state in memory, and a deployed client keeps
its own on its own disk, so state lives in files, one folder per client that has any (space grows with the
clients that trained, not with the population). Each save is a version tagged with its round, written to a
temporary file and renamed into place, and `load(cid, before=r)` returns the newest version older than round
r. That is what makes resume exact: a run killed inside round r and resumed from its last committed round
replays round r, and every client then reads the state it had before round r, even if it had already saved
round r's state before the kill. The two newest versions are kept, which is all a replay needs.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..serialize import decode_state, encode_state
from ..types import State

_VERSION = re.compile(r"^r(\d{1,12})\.flt$")
KEEP_VERSIONS = 2


class ClientStateStore:
    """Versioned per-client states under `root` (created 0700 if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _folder(self, cid: str) -> Path:
        # hex of the id: any client id maps to one safe folder name (no '..', '/', or case folding)
        return self.root / str(cid).encode().hex()

    def _versions(self, cid: str) -> list[int]:
        folder = self._folder(cid)
        if not folder.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, cid: str, before: int | None = None) -> State | None:
        """The newest state of `cid` saved in a round earlier than `before` (any round when None), or None."""
        versions = [v for v in self._versions(cid) if before is None or v < before]
        if not versions:
            return None
        return decode_state((self._folder(cid) / f"r{versions[-1]}.flt").read_bytes())

    def save(self, cid: str, rnd: int, state: State) -> None:
        """Save `state` as client `cid`'s state after round `rnd` (atomically), dropping older versions."""
        if rnd < 0:
            raise ValueError(f"round must be >= 0, got {rnd}")
        folder = self._folder(cid)
        folder.mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(encode_state(state))
            os.replace(tmp, folder / f"r{rnd}.flt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in self._versions(cid)[:-KEEP_VERSIONS]:
            (folder / f"r{old}.flt").unlink(missing_ok=True)

    def clients(self) -> list[str]:
        """Ids of the clients that have saved state."""
        ids = []
        for folder in sorted(self.root.iterdir()):
            try:
                ids.append(bytes.fromhex(folder.name).decode())
            except ValueError:
                continue  # not one of ours
        return ids
