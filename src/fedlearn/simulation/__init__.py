"""Client pools for simulation on one machine."""
from .faults import FaultInjector
from .inprocess import InProcessPool

__all__ = ["InProcessPool", "FaultInjector"]
