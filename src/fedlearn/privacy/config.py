"""Privacy settings: the ``[privacy]`` section of a run's TOML config, or the --dp-* / --secagg flags.

Keys (all optional; nothing is on by default)::

    dp_clip          central DP: L2 clip norm C of every client update (0 = central DP off)
    dp_noise         noise multiplier z (std z*C on the sum); or give target_epsilon instead
    target_epsilon   find z so that epsilon after all rounds is this (at dp_delta)
    dp_delta         accounting delta (default 1e-5)
    epsilon_budget   stop the run before a round would exceed this epsilon (default: target_epsilon)
    accountant       "rdp" or "pld"
    sampling         "fixed" (the sampling section's cohort) or "poisson" (same expected cohort)
    adaptive_clip    track a quantile of update norms (Andrew et al. 2021); dp_clip is the start value
    clip_quantile, clip_lr, count_noise    adaptive clipping parameters
    local_dp_clip, local_dp_noise          local DP on each client (both > 0 to enable)
    secagg           secure aggregation on/off
    secagg_graph     "sparse" (SecAgg+) or "full"; secagg_degree, secagg_threshold, secagg_range
    dp_distributed   distributed DP (needs secagg and dp_clip): each client adds its share of the noise, so the
                     server never holds an un-noised sum; calibrated for the fewest survivors the round accepts
    he               homomorphic-encryption aggregation (CKKS, TenSEAL; `pip install -e ".[he]"`) instead of
                     secagg: clients hold the secret key, the server adds ciphertexts; he_public_key (deployment)
                     is the server's public context file from `fedlearn he-keys`
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..plugins import dataclass_from_dict
from .accountant import ACCOUNTANTS, SAMPLINGS


@dataclass(frozen=True)
class PrivacyConfig:
    """Validated privacy settings (see the module docstring for each key)."""

    dp_clip: float = 0.0
    dp_noise: float | None = None
    target_epsilon: float | None = None
    dp_delta: float = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "rdp"
    sampling: str = "fixed"
    adaptive_clip: bool = False
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None
    local_dp_clip: float = 0.0
    local_dp_noise: float = 0.0
    secagg: bool = False
    secagg_graph: str = "sparse"
    secagg_degree: int | None = None
    secagg_threshold: float = 0.5
    secagg_range: float | None = None
    dp_distributed: bool = False
    he: bool = False
    he_public_key: str | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"privacy: {message}")

        need(self.dp_clip >= 0, "dp_clip must be >= 0")
        need(self.dp_noise is None or self.dp_noise >= 0, "dp_noise must be >= 0")
        need(self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon must be > 0")
        need(self.epsilon_budget is None or self.epsilon_budget > 0, "epsilon_budget must be > 0")
        need(0 < self.dp_delta < 1, "dp_delta must be in (0, 1)")
        need(self.accountant in ACCOUNTANTS, f"accountant must be one of {', '.join(ACCOUNTANTS)}")
        need(self.sampling in SAMPLINGS, f"sampling must be one of {', '.join(SAMPLINGS)}")
        if self.central:
            need((self.dp_noise is None) != (self.target_epsilon is None),
                 "with dp_clip set, give exactly one of dp_noise and target_epsilon")
        else:
            need(self.dp_noise is None and self.target_epsilon is None and not self.adaptive_clip
                 and self.epsilon_budget is None, "dp_noise, target_epsilon, epsilon_budget and adaptive_clip need dp_clip > 0")
        need((self.local_dp_clip > 0) == (self.local_dp_noise > 0), "local DP needs both local_dp_clip and local_dp_noise > 0")
        need(not (self.adaptive_clip and self.secagg),
             "adaptive clipping needs each client's clipped/unclipped bit, which secure aggregation hides; "
             "use a fixed dp_clip with secagg")
        need(self.secagg_range is None or self.secagg_range > 0, "secagg_range must be > 0")
        need(not (self.he and self.secagg), "choose one of secagg and he: both hide individual updates")
        need(not (self.adaptive_clip and self.he),
             "adaptive clipping needs each client's clipped/unclipped bit, which HE aggregation hides")
        need(not self.dp_distributed or (self.secagg and self.central),
             "dp_distributed needs secagg and central DP (dp_clip with dp_noise or target_epsilon): the clients' "
             "noise shares add up to the target noise only inside the secure sum")

    @property
    def central(self) -> bool:
        return self.dp_clip > 0

    @property
    def local(self) -> bool:
        return self.local_dp_clip > 0

    @property
    def enabled(self) -> bool:
        return self.central or self.local or self.secagg or self.he

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PrivacyConfig":
        return dataclass_from_dict(cls, values, ValueError, "privacy: ")
