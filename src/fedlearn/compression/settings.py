"""Compression settings as plain data: what a TOML `[compression]` table, a `--compress` flag and a task's
downlink instructions hold, turned into compression transforms with errors that name the bad setting.

A setting is a table with `method` and that method's parameters::

    [compression.uplink]            # what clients send
    method = "qsgd"                 # none, bf16, fp16, qsgd, topk, randomk
    bits = 3
    fraction = 0.3
    [compression.downlink]          # the global-model change the server sends
    method = "qsgd"
    bits = 8

and on the command line ``--compress qsgd:bits=3,fraction=0.3 --downlink-compress qsgd:bits=8``.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..plugins import closest
from .transforms import QSGD, Cast, Compression, RandomK, TopK

# method -> (parameter -> allowed Python types)
_PARAMS: dict[str, dict[str, tuple[type, ...]]] = {
    "none": {},
    "bf16": {},
    "fp16": {},
    "qsgd": {"bits": (int,), "block": (int,), "scale_dtype": (str,), "fraction": (int, float)},
    "topk": {"fraction": (int, float), "error_feedback": (bool,), "state_dir": (str,)},
    "randomk": {"fraction": (int, float), "rescale": (bool,)},
}
METHODS = tuple(_PARAMS)
DOWNLINK_METHODS = ("none", "bf16", "fp16", "qsgd", "topk", "randomk")


def compression_from_spec(spec: Mapping[str, Any] | None, where: str = "[compression.uplink]") -> Compression | None:
    """The transform a setting table describes (None for method "none" or an empty table); `ValueError`
    naming `where` and the setting for anything wrong."""
    if not spec:
        return None
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a table with method = one of {', '.join(METHODS)}, got {spec!r}")
    method = spec.get("method")
    if method not in _PARAMS:
        hint = closest(method, METHODS, repr) if isinstance(method, str) else ""
        raise ValueError(f"{where} method must be one of {', '.join(METHODS)}, got {method!r}{hint}")
    params = {k: v for k, v in spec.items() if k != "method"}
    allowed = _PARAMS[method]
    for key, value in params.items():
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"{where} method {method!r} has no setting {key!r}{closest(key, allowed, repr)} "
                             f"(its settings: {known})")
        kinds = allowed[key]
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise ValueError(f"{where} {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} {key} must be finite, got {value!r}")
    try:
        if method == "none":
            return None
        if method in ("bf16", "fp16"):
            return Cast("bfloat16" if method == "bf16" else "float16")
        if method == "qsgd":
            return QSGD(params.pop("bits", 4), params.pop("block", 256), **params)
        if method == "topk":
            return TopK(**params)
        return RandomK(**params)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def spec_of(transform: Compression) -> dict[str, Any]:
    """The setting table that rebuilds `transform` (`compression_from_spec(spec_of(t))` acts as `t`); what a
    task carries to tell clients how the downlink change is packed."""
    if isinstance(transform, Cast):
        return {"method": "bf16" if transform.dtype == "bfloat16" else "fp16"}
    if isinstance(transform, QSGD):
        return {"method": "qsgd", "bits": transform.bits, "block": transform.block,
                "scale_dtype": transform.scale_dtype, "fraction": transform.fraction}
    if isinstance(transform, TopK):
        return {"method": "topk", "fraction": transform.fraction, "error_feedback": transform.error_feedback}
    if isinstance(transform, RandomK):
        return {"method": "randomk", "fraction": transform.fraction, "rescale": transform.rescale}
    raise ValueError(f"{type(transform).__name__} has no setting table")


@dataclass(frozen=True)
class CompressionSettings:
    """The `[compression]` table: `uplink` and `downlink` setting tables (empty: uncompressed). `measured`
    is true when the table is present at all: the run then measures its bytes on the wire."""

    uplink: Compression | None = None
    downlink: Compression | None = None
    measured: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CompressionSettings":
        unknown = set(values) - {"uplink", "downlink"}
        if unknown:
            raise ValueError(f"unknown [compression] setting(s) {', '.join(sorted(unknown))}: it holds the tables "
                             "[compression.uplink] and [compression.downlink] (each with method = ...)")
        uplink = compression_from_spec(values.get("uplink"), "[compression.uplink]")
        downlink = compression_from_spec(values.get("downlink"), "[compression.downlink]")
        if isinstance(downlink, TopK) and downlink.error_feedback:
            raise ValueError("[compression.downlink] topk needs error_feedback = false: the downlink already feeds "
                             "its error back (each change is taken against the model clients hold)")
        return cls(uplink, downlink, measured=bool(values))


def add_compression_flags(parser: argparse.ArgumentParser, downlink: bool = True) -> None:
    parser.add_argument("--compress", metavar="METHOD[:KEY=VALUE,...]",
                        help="compress updates: none, bf16, fp16, qsgd, topk or randomk with its settings, e.g. "
                             "qsgd:bits=3,fraction=0.3,scale_dtype=float16 ([compression.uplink] in TOML)")
    if downlink:
        parser.add_argument("--downlink-compress", metavar="METHOD[:KEY=VALUE,...]",
                            help="send clients the compressed change of the global model, e.g. qsgd:bits=8 "
                                 "([compression.downlink] in TOML)")


def compression_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The [compression] tables the flags give (`compression_from_spec` validates them)."""
    from ..cli import parse_params
    tables = {}
    for flag, key in (("compress", "uplink"), ("downlink_compress", "downlink")):
        text = getattr(args, flag, None)
        if text is not None:
            method, _, rest = text.partition(":")
            tables[key] = {"method": method.strip(), **parse_params([p for p in rest.split(",") if p.strip()])}
    return tables
