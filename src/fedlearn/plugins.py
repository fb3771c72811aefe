"""Build plug-ins and settings objects from names and plain dicts (CLI flags, TOML tables), turning a typo
or a wrong keyword into an error that names what is allowed."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
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
