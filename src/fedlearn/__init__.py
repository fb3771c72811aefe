"""fedlearn: federated learning with one round loop for simulation and deployment."""
from .aggregators import make_aggregator
from .analytics import FederatedStatistics, Standardizer, StatisticsDP, federated_statistics, simulate_statistics
from .app import App, load_app
from .audit.verify import verify_run
from .client import Client
from .compression import QSGD, Cast, RandomK, TopK
from .config import ConfigError, SimulationConfig
from .contributions import ContributionAccounting
from .metrics import classification_metrics, client_mean_metrics, weighted_mean_metrics
from .params import Layout, LayoutError
from .privacy import CentralDP, LocalDP, gaussian_epsilon, noise_for_epsilon
from .serialize import SerializationError, decode_state, decode_update, encode_state, encode_update
from .server import ClientPool, ClientSampler, History, RoundAborted, RoundFailedError, RunDirConflict, RunStore, Server
from .server.anomaly import AnomalyChecks
from .server.async_loop import AsyncServer, AsyncSettings, ThreadExecutor, staleness_weight
from .simulate import SimulationResult, run_simulation, simulate
from .simulation import ClockedPool, FaultInjector, Fleet, InProcessPool, VirtualClock, VirtualExecutor, WirePool
from .strategies import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedNova, FedProx, FedYogi, Scaffold, Strategy, make_strategy
from .torch import TorchClient
from .transforms import Transform
from .types import EvalResult, Failure, State, Update

__version__ = "0.1.0"

__all__ = [
    "Client", "TorchClient", "Update", "Failure", "EvalResult", "State", "Layout", "LayoutError",
    "encode_state", "decode_state", "encode_update", "decode_update", "SerializationError",
    "Server", "ClientPool", "ClientSampler", "History", "RoundFailedError", "RoundAborted", "RunStore", "RunDirConflict",
    "InProcessPool", "FaultInjector", "Strategy", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi",
    "FedAdagrad", "Scaffold", "FedNova", "make_strategy", "make_aggregator", "AnomalyChecks", "Transform",
    "CentralDP", "LocalDP", "noise_for_epsilon", "gaussian_epsilon",
    "simulate", "run_simulation", "SimulationResult", "SimulationConfig", "ConfigError",
    "AsyncServer", "AsyncSettings", "ThreadExecutor", "staleness_weight", "Fleet", "VirtualClock", "ClockedPool",
    "VirtualExecutor", "WirePool", "QSGD", "TopK", "RandomK", "Cast",
    "verify_run", "ContributionAccounting",
    "App", "load_app", "classification_metrics", "weighted_mean_metrics", "client_mean_metrics",
    "federated_statistics", "simulate_statistics", "FederatedStatistics", "StatisticsDP", "Standardizer",
]
