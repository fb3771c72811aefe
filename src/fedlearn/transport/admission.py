"""Admission control for the server's streams, so that connections which never authenticate (anyone holding
the public ca.pem can open them) cannot take the slots of registered clients or of `fedlearn status`.

A new stream waits, unauthenticated, in a small pool: at most `per_peer` from one peer address and `total`
in all. A newcomer over either budget evicts the oldest waiting stream of its peer (or, over the total, the
oldest of all) rather than being refused: an honest client authenticates within a few round trips, so a
flood would have to open a budget's worth of streams in those milliseconds to push it out, whereas refusing
newcomers would let a flood that keeps the pool full lock everyone out. Every waiting stream is closed after
`handshake_timeout` at the latest. Authenticated streams (at most `max_clients`) and status calls (at most
`status_calls` at a time) are counted apart, and gRPC's own cap on concurrent calls is the sum of the three
budgets plus a margin for streams that are being turned away, so it is never what refuses an honest caller.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

TURNAWAY_MARGIN = 32  # calls being turned away or closed at any moment, over the three budgets
LOG_EVERY = 10.0  # seconds between log lines about closed unauthenticated streams


class Busy(Exception):
    """No slot for this stream or call; the message says which budget is full."""


@dataclass(eq=False)
class Ticket:
    """One stream's place: waiting (unauthenticated), authenticated, or out (evicted, timed out, closed)."""

    host: str
    cancel: Callable[[], None]
    deadline: float
    state: str = "waiting"


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string: "ipv4:10.0.0.5:51234" -> "ipv4:10.0.0.5"."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class Admission:
    """The budgets of one server; `capacity` is the cap to give gRPC."""

    def __init__(self, *, max_clients: int, total: int, per_peer: int, status_calls: int,
                 handshake_timeout: float) -> None:
        if min(max_clients, total, per_peer, status_calls) < 1 or handshake_timeout <= 0:
            raise ValueError("admission budgets must be >= 1 and the handshake timeout > 0")
        self.max_clients, self.total, self.per_peer = max_clients, total, per_peer
        self.status_calls, self.handshake_timeout = status_calls, handshake_timeout
        self._cond = threading.Condition()
        self._waiting: list[Ticket] = []  # oldest first
        self._clients = self._status = 0
        self._reaper: threading.Thread | None = None
        self.evicted = self.timed_out = 0
        self._logged_at, self._logged = 0.0, (0, 0)

    @property
    def capacity(self) -> int:
        return self.max_clients + self.total + self.status_calls + TURNAWAY_MARGIN

    def enter(self, peer: str, cancel: Callable[[], None]) -> Ticket:
        """Admit a new, unauthenticated stream, evicting an older waiting one if a budget is full."""
        ticket = Ticket(peer_host(peer), cancel, time.monotonic() + self.handshake_timeout)
        with self._cond:
            same_peer = [t for t in self._waiting if t.host == ticket.host]
            victim = (same_peer[0] if len(same_peer) >= self.per_peer
                      else self._waiting[0] if len(self._waiting) >= self.total else None)
            if victim is not None:
                self._waiting.remove(victim)
                victim.state = "out"
                self.evicted += 1
            self._waiting.append(ticket)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="fedlearn-handshake-reaper", daemon=True)
                self._reaper.start()
            self._cond.notify_all()
        if victim is not None:
            victim.cancel()
            self._log_closed()
        return ticket

    def authenticated(self, ticket: Ticket) -> None:
        """Move an authenticated stream out of the waiting pool; `Busy` if it was evicted meanwhile or the
        server already serves `max_clients` streams."""
        with self._cond:
            if ticket.state != "waiting":
                raise Busy("the handshake took too long or was pushed out by newer connections; reconnect")
            self._waiting.remove(ticket)
            if self._clients >= self.max_clients:
                ticket.state = "out"
                raise Busy(f"the server already serves its maximum of {self.max_clients} client connections")
            self._clients += 1
            ticket.state = "authenticated"

    def leave(self, ticket: Ticket) -> None:
        """The stream ended, in whatever state."""
        with self._cond:
            if ticket.state == "waiting":
                self._waiting.remove(ticket)
            elif ticket.state == "authenticated":
                self._clients -= 1
            ticket.state = "out"

    @contextmanager
    def status_call(self) -> Iterator[None]:
        """Hold one of the status slots for the duration of a status call; `Busy` if all are taken."""
        with self._cond:
            if self._status >= self.status_calls:
                raise Busy(f"{self.status_calls} status calls are already being answered; try again")
            self._status += 1
        try:
            yield
        finally:
            with self._cond:
                self._status -= 1

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "clients": self._clients, "status": self._status,
                    "evicted": self.evicted, "timed_out": self.timed_out}

    def _reap(self) -> None:
        """Close waiting streams at their deadline; runs while any stream waits."""
        while True:
            with self._cond:
                if not self._waiting:
                    self._reaper = None
                    return
                now = time.monotonic()
                expired = [t for t in self._waiting if t.deadline <= now]
                for ticket in expired:
                    self._waiting.remove(ticket)
                    ticket.state = "out"
                self.timed_out += len(expired)
                if not expired:
                    self._cond.wait(min(t.deadline for t in self._waiting) - now)
            for ticket in expired:
                ticket.cancel()
            if expired:
                self._log_closed()

    def _log_closed(self) -> None:
        """One line at most every LOG_EVERY seconds, however many streams a flood makes us close."""
        now = time.monotonic()
        with self._cond:
            counts = (self.evicted, self.timed_out)
            if now - self._logged_at < LOG_EVERY or counts == self._logged:
                return
            self._logged_at, self._logged = now, counts
        log.warning("event=unauthenticated_streams_closed evicted=%d timed_out=%d budget_per_peer=%d budget_total=%d",
                    counts[0], counts[1], self.per_peer, self.total)
