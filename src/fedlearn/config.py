"""Simulation settings: one dataclass, readable from a TOML file with sections and overridable by flags.

TOML layout (every key optional)::

    seed = 0
    rounds = 30
    [data]      dataset, partition, alpha, shards_per_client, sigma, num_clients, synthetic_alpha, synthetic_beta
    [model]     name
    [sampling]  clients_per_round | fraction, min_clients, eval_clients, max_examples
    [strategy]  name, then the strategy's own parameters (server_lr, mu, ...)
    [client]    local_epochs, batch_size, lr, momentum
    [faults]    crash_rate, drop_rate, straggler_rate
    [aggregator] name (replaces the strategy's weighted mean: median, krum, ...), then its parameters (f, beta, ...)
    [attack]    name (label_flip, sign_flip, noise, alie, ipm, backdoor), fraction, then its parameters
    [anomaly]   enabled, then thresholds of the anomaly checks (norm_z, cosine_z, min_updates)
    [privacy]   dp_clip, dp_noise | target_epsilon, dp_delta, epsilon_budget, accountant, sampling, adaptive_clip,
                local_dp_clip, local_dp_noise, secagg, ... (see `fedlearn.privacy.config`)
    [simulation] backend (sequential, vectorized, process, ray), ray_address (a Ray cluster; empty: local Ray)
    [app]       factory = "package.module:make_app" (your task instead of [data], [model], [strategy], [client]),
                dir (folder to import it from, relative to the file), then the factory's keyword arguments
    [contributions] methods (gtg, loo, exact, cosine), metric, truncation, tolerance (empty: no accounting)
    [compression.uplink] / [compression.downlink]  method (none, bf16, fp16, qsgd, topk, randomk), then its
                parameters (bits, block, scale_dtype, fraction, ...); see `fedlearn.compression.settings`
    [async]     buffer_size, concurrency, max_staleness, staleness, ... and the simulated fleet's speed_sigma,
                mean_offline, ...: FedBuff instead of rounds (see `fedlearn.asynchronous`; empty: synchronous)
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plugins import closest, dataclass_from_dict
from .privacy.config import PrivacyConfig

if TYPE_CHECKING:
    from .asynchronous import AsyncConfig

DATASETS = ("digits", "breast_cancer", "synthetic", "femnist", "leaf")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
BACKENDS = ("sequential", "vectorized", "process", "ray")


class ConfigError(ValueError):
    """A setting with a bad value; the message says which and what is allowed."""


@dataclass
class SimulationConfig:
    """Everything a built-in simulation needs. Defaults are the README's default run."""

    seed: int = 0
    rounds: int = 30
    # data
    dataset: str = "digits"
    data_path: str = ""
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    sigma: float = 1.0
    num_clients: int = 100
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    # model
    model: str = "mlp"
    # sampling
    clients_per_round: int | None = 10
    fraction: float | None = None
    min_clients: int = 1
    eval_clients: int = 10
    max_examples: int = 100_000  # cap on the example count (FedAvg weight) a client may claim
    # strategy
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    # client
    local_epochs: int = 5
    batch_size: int = 5
    lr: float = 0.1
    momentum: float = 0.0
    # faults
    crash_rate: float = 0.0
    drop_rate: float = 0.0
    straggler_rate: float = 0.0
    # robustness: "" keeps the strategy's own aggregator / runs no attack
    aggregator: str = ""
    aggregator_params: dict[str, Any] = field(default_factory=dict)
    attack: str = ""
    attack_fraction: float = 0.2
    attack_params: dict[str, Any] = field(default_factory=dict)
    anomaly_checks: bool = True
    anomaly_params: dict[str, Any] = field(default_factory=dict)
    # privacy: DP and secure aggregation settings, validated by `PrivacyConfig`
    privacy: dict[str, Any] = field(default_factory=dict)
    # simulation engine: where and how clients train (same results, different speed)
    backend: str = "sequential"
    ray_address: str = ""
    # the user's app (`fedlearn.app.app_from_settings`): factory, dir, factory arguments; empty: built-in task
    app: dict[str, Any] = field(default_factory=dict)
    # contribution accounting: ContributionAccounting settings; empty: off
    contributions: dict[str, Any] = field(default_factory=dict)
    # compression of updates and of the global-model change: `CompressionSettings`; empty: off
    compression: dict[str, Any] = field(default_factory=dict)
    # asynchronous training (FedBuff): the [async] section, validated by `AsyncConfig`; empty: synchronous rounds
    asynchronous: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad setting."""
        _check(self.rounds >= 1, "rounds must be >= 1")
        _check(self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)} (got {self.dataset!r})")
        _check(self.dataset not in ("femnist", "leaf") or bool(self.data_path),
               f"dataset {self.dataset!r} needs data_path (--data-path) pointing at the files")
        _check(self.partition in PARTITIONS, f"partition must be one of {', '.join(PARTITIONS)} (got {self.partition!r})")
        _check(self.alpha > 0, "alpha must be > 0")
        _check(self.num_clients >= 1, "num_clients must be >= 1")
        _check(self.model in ("mlp", "logreg"), f"model must be 'mlp' or 'logreg' (got {self.model!r})")
        _check((self.clients_per_round is None) != (self.fraction is None),
               "give exactly one of clients_per_round and fraction")
        _check(self.clients_per_round is None or self.clients_per_round >= 1, "clients_per_round must be >= 1")
        _check(self.fraction is None or 0 < self.fraction <= 1, "fraction must be in (0, 1]")
        _check(self.min_clients >= 1, "min_clients must be >= 1")
        _check(self.eval_clients >= 0, "eval_clients must be >= 0")
        _check(isinstance(self.max_examples, int) and 1 <= self.max_examples <= 2**53,
               "max_examples must be an integer in [1, 2**53]")
        _check(isinstance(self.strategy_params, dict), "strategy parameters must be a table of name = value")
        _check(self.local_epochs >= 1, "local_epochs must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        for name in ("aggregator_params", "attack_params", "anomaly_params"):
            _check(isinstance(getattr(self, name), dict), f"{name} must be a table of name = value")
        _check(0 <= self.attack_fraction < 1, "attack fraction must be in [0, 1)")
        _check(isinstance(self.privacy, dict), "privacy settings must be a table of name = value")
        try:
            PrivacyConfig.from_dict(self.privacy)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("crash_rate", "drop_rate", "straggler_rate"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]")
        _check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        _check(not self.ray_address or self.backend == "ray", "ray_address needs backend 'ray'")
        _check(isinstance(self.app, dict), "app settings must be a table of name = value")
        _check(not self.app or isinstance(self.app.get("factory"), str),
               '[app] needs factory = "package.module:function"')
        _check(isinstance(self.contributions, dict), "contribution settings must be a table of name = value")
        self._validate_compression()
        self._validate_async()
        if self.ray_address:
            from .simulation.ray_pool import check_ray_address

            try:
                check_ray_address(self.ray_address)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def _validate_compression(self) -> None:
        from .compression.settings import CompressionSettings

        _check(isinstance(self.compression, dict), "compression settings must be a table of name = value")
        try:
            CompressionSettings.from_dict(self.compression)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _validate_async(self) -> None:
        """The [async] settings, and what asynchronous training cannot be combined with."""
        if not self.asynchronous:
            return
        from .asynchronous import AsyncConfig

        _check(isinstance(self.asynchronous, dict), "async settings must be a table of name = value")
        AsyncConfig.from_dict(self.asynchronous)
        _check(not self.privacy, "[async] cannot be combined with [privacy]: DP accounting and secure aggregation "
                                 "assume synchronous rounds of sampled clients")
        _check(not self.contributions, "[async] cannot be combined with [contributions]: contributions are scored "
                                       "per synchronous round")
        _check(not self.compression, "[async] cannot be combined with [compression] yet: the asynchronous server "
                                     "neither compresses nor measures what travels; remove one of the two")
        _check(self.eval_clients in (0, SimulationConfig.eval_clients),
               "[sampling] eval_clients: federated evaluation does not run with [async] (the server evaluates "
               "centrally every [async] eval_every steps); remove it or set it to 0")

    def async_config(self) -> "AsyncConfig | None":
        """The validated [async] settings, or None for synchronous rounds."""
        from .asynchronous import AsyncConfig

        return AsyncConfig.from_dict(self.asynchronous) if self.asynchronous else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SimulationConfig":
        return dataclass_from_dict(cls, values, ConfigError, describe=setting_name)


# TOML (section, key) -> field name, where they differ.
_RENAMES = {("model", "name"): "model", ("strategy", "name"): "strategy", ("aggregator", "name"): "aggregator",
            ("attack", "name"): "attack", ("attack", "fraction"): "attack_fraction",
            ("anomaly", "enabled"): "anomaly_checks"}
_SECTIONS = ("data", "model", "sampling", "strategy", "client", "faults", "aggregator", "attack", "anomaly", "privacy",
             "simulation", "contributions", "app", "compression", "async")
# Sections whose keys (other than those renamed above) are free-form parameters of the named plug-in.
_PLUGIN_SECTIONS = {"strategy": "strategy_params", "aggregator": "aggregator_params", "attack": "attack_params",
                    "anomaly": "anomaly_params", "privacy": "privacy", "contributions": "contributions", "app": "app",
                    "compression": "compression", "async": "asynchronous"}

_TOP = ("seed", "rounds")
_SECTION_KEYS = {
    "data": ("dataset", "data_path", "partition", "alpha", "shards_per_client", "sigma", "num_clients",
             "synthetic_alpha", "synthetic_beta"),
    "sampling": ("clients_per_round", "fraction", "min_clients", "eval_clients", "max_examples"),
    "client": ("local_epochs", "batch_size", "lr", "momentum"),
    "faults": ("crash_rate", "drop_rate", "straggler_rate"),
    "simulation": ("backend", "ray_address"),
}
# field -> where it lives in a TOML file: (section, key); section "" is the top level
_HOME = {**{f: ("", f) for f in _TOP}, **{f: (sec, f) for sec, keys in _SECTION_KEYS.items() for f in keys},
         **{field_name: key for key, field_name in _RENAMES.items()},
         **{field_name: (sec, "<parameter>") for sec, field_name in _PLUGIN_SECTIONS.items()}}


def setting_name(field_name: str) -> str:
    """How a setting is written in a config file: "[data] alpha", "[strategy] name", "rounds"."""
    section, key = _HOME.get(field_name, ("", field_name))
    if key == "<parameter>":
        return f"the [{section}] table"
    return f"[{section}] {key}" if section else key


def _check_key(path: str | Path, section: str, key: str) -> None:
    """Refuse a key that is not a setting of `section` ("" = top level), suggesting the closest setting."""
    allowed = _TOP if not section else _SECTION_KEYS.get(section, ())
    if key in allowed:
        return
    where = f"[{section}]" if section else "the top level"
    home = _HOME.get(key)
    if home is not None and home[1] == key:
        raise ConfigError(f"{path}: {key!r} belongs in {setting_name(key).rsplit(' ', 1)[0] if home[0] else 'the top level'}, "
                          f"not in {where}")
    every = {f"{k}": setting_name(f) for f, (sec, k) in _HOME.items() if k != "<parameter>"}
    suggestion = closest(key, every, lambda k: every[k])
    raise ConfigError(f"{path}: unknown setting {key!r} in {where}{suggestion}")


def load_toml(path: str | Path, extra_sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a TOML config into flat field values (sections flattened). Sections named in `extra_sections`
    (settings of another front door, such as a deployment's [server]) come back whole under their name."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in extra_sections:
            flat[key] = value
        elif isinstance(value, dict):
            if key not in _SECTIONS:
                raise ConfigError(f"unknown section [{key}] in {path}{closest(key, _SECTIONS, lambda s: f'[{s}]')}; "
                                  f"sections are {', '.join(_SECTIONS)}")
            for sub, v in value.items():
                if key in _PLUGIN_SECTIONS and (key, sub) not in _RENAMES:
                    flat.setdefault(_PLUGIN_SECTIONS[key], {})[sub] = v
                elif (key, sub) in _RENAMES:
                    flat[_RENAMES[key, sub]] = v
                else:
                    _check_key(path, key, sub)
                    flat[sub] = v
        else:
            _check_key(path, "", key)
            flat[key] = value
    if "fraction" in flat and "clients_per_round" not in flat:
        flat["clients_per_round"] = None
    app_dir = flat.get("app", {}).get("dir")
    if isinstance(app_dir, str) and not Path(app_dir).is_absolute():
        flat["app"]["dir"] = str(Path(path).parent / app_dir)
    elif "app" in flat and app_dir is None:
        flat["app"]["dir"] = str(Path(path).parent)
    return flat


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
