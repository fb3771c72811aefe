"""Build plug-ins and settings objects from names and plain dicts (CLI flags, TOML tables), turning a typo
or a wrong keyword into an error that names what is allowed."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def build_named(registry: Mapping[str, Callable[..., T]], kind: str, name: str, params: Mapping[str, Any]) -> T:
    """`registry[name](**params)`; raises `ValueError` for an unknown name or bad parameters."""
    try:
        factory = registry[name.lower()]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for {kind} {name!r}: {exc}") from None


def dataclass_from_dict(cls: Callable[..., T], values: Mapping[str, Any], error: type[Exception], label: str = "") -> T:
    """`cls(**values)` for a dataclass, refusing unknown keys by name (`label` prefixes the message)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - known
    if unknown:
        raise error(f"{label}unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise error(f"{label}{exc}") from None


def load_object(spec: str, app_dir: str | Path = ".", flag: str = "--app") -> Callable[..., Any]:
    """The callable named by 'package.module:function', importable from `app_dir` or the Python path;
    `flag` names the option it came from in errors."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{flag} must look like 'package.module:function', got {spec!r}")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r} for {flag}: {exc}") from None
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no function {attr!r} (from {flag} {spec})") from None
    if not callable(found):
        raise ValueError(f"{spec} (from {flag}) is not callable")
    return found
