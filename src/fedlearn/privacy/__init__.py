"""Differential privacy: client-level central DP (DP-FedAvg, fixed or adaptive clipping), local DP,
sample-level DP-SGD on clients (Opacus, optional), and privacy accounting with dp-accounting."""
from .accountant import PrivacyBudgetError, SampledGaussian, affordable_rounds, gaussian_epsilon, noise_for_epsilon
from .central import CentralDP, PrivacyBudgetExhausted
from .clipping import AdaptiveClipping, clip_l2
from .config import PrivacyConfig
from .local import LocalDP
from .setup import PrivacySetup, build_privacy

__all__ = ["CentralDP", "LocalDP", "AdaptiveClipping", "clip_l2", "SampledGaussian", "noise_for_epsilon",
           "affordable_rounds", "gaussian_epsilon", "PrivacyBudgetError", "PrivacyBudgetExhausted", "PrivacyConfig",
           "PrivacySetup", "build_privacy"]
