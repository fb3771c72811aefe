"""Client pools for simulation on one machine, and the virtual clock of a slow, unreliable fleet."""
from .clock import Fleet, VirtualClock
from .clocked import ClockedPool, VirtualExecutor
from .faults import FaultInjector
from .inprocess import InProcessPool
from .wire import WirePool

__all__ = ["InProcessPool", "FaultInjector", "Fleet", "VirtualClock", "ClockedPool", "VirtualExecutor", "WirePool"]
