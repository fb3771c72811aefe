"""Secure aggregation (SecAgg / SecAgg+): the server learns only the sum of the clients' updates."""
from .client import SecAggClient
from .keys import Identities
from .protocol import STAGES, ClientPolicy, SecAggConfig, SecAggError
from .quantize import Quantizer
from .server import SecAggAbort, SecAggProtocol

__all__ = ["SecAggClient", "SecAggProtocol", "SecAggConfig", "SecAggError", "SecAggAbort", "Identities",
           "Quantizer", "STAGES", "ClientPolicy"]
