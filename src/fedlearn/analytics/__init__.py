"""Federated statistics (analytics): per-feature count, mean, variance, min/max and histogram quantiles over the
clients of any pool, in one or two exchanges, optionally under secure aggregation and DP, and a standardiser
built from them. The client half is `summary.py`, the server half `server.py`."""
from .privacy import StatisticsDP
from .server import federated_statistics, simulate_statistics, summary_problem
from .standardize import Standardizer
from .stats import FederatedStatistics
from .summary import FeatureRows, SummaryRequest

__all__ = ["federated_statistics", "simulate_statistics", "summary_problem", "FederatedStatistics", "StatisticsDP",
           "Standardizer", "SummaryRequest", "FeatureRows"]
