"""Orchestration: the round loop, client pools' interface, sampling and the run store."""
from .pool import ClientPool
from .round_loop import History, RoundFailedError, Server
from .sampling import ClientSampler
from .store import RoundRecord, RunStore

__all__ = ["Server", "History", "RoundFailedError", "ClientPool", "ClientSampler", "RunStore", "RoundRecord"]
