"""Personalisation: FedPer, FedRep, Ditto and fine-tuning, a per-client state store on disk, and per-client
evaluation that reports who gained and who lost."""
from .client import METHODS, PersonalTorchClient, local_names, shared_state
from .evaluate import PersonalizationReport, compare, per_client_metric
from .state_store import ClientStateStore

__all__ = [
    "METHODS",
    "ClientStateStore",
    "PersonalTorchClient",
    "PersonalizationReport",
    "compare",
    "local_names",
    "per_client_metric",
    "shared_state",
]
