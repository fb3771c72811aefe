"""Orchestration: the round loop, client pools' interface, sampling and the run store."""
from .pool import ClientPool
from .round_loop import History, RoundFailedError, Server
from .sampling import ClientSampler
from .protocol import RoundAborted
from .store import RoundRecord, RunDirConflict, RunStore

__all__ = ["Server", "History", "RoundFailedError", "RoundAborted", "ClientPool", "ClientSampler", "RunStore",
           "RunDirConflict", "RoundRecord"]
