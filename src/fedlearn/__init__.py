"""fedlearn: federated learning with one round loop for simulation and deployment."""
from .client import Client
from .config import ConfigError, SimulationConfig
from .params import Layout, LayoutError
from .serialize import SerializationError, decode_state, decode_update, encode_state, encode_update
from .server import ClientPool, ClientSampler, History, RoundFailedError, RunStore, Server
from .simulate import SimulationResult, run_simulation, simulate
from .simulation import FaultInjector, InProcessPool
from .strategies import FedAvg, FedProx, Strategy, make_strategy
from .torch import TorchClient
from .transforms import Transform
from .types import EvalResult, Failure, State, Update

__version__ = "0.1.0"

__all__ = [
    "Client", "TorchClient", "Update", "Failure", "EvalResult", "State", "Layout", "LayoutError",
    "encode_state", "decode_state", "encode_update", "decode_update", "SerializationError",
    "Server", "ClientPool", "ClientSampler", "History", "RoundFailedError", "RunStore",
    "InProcessPool", "FaultInjector", "Strategy", "FedAvg", "FedProx", "make_strategy", "Transform",
    "simulate", "run_simulation", "SimulationResult", "SimulationConfig", "ConfigError",
]
