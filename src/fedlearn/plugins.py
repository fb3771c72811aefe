"""Build plug-ins and settings objects from names and plain dicts (CLI flags, TOML tables), turning a typo
or a wrong keyword into an error that names what is allowed."""
from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


def build_named(registry: Mapping[str, Callable[..., T]], kind: str, name: str, params: Mapping[str, Any]) -> T:
    """`registry[name](**params)`; raises `ValueError` for an unknown name or bad parameters, listing the
    valid names or the factory's parameters."""
    if not isinstance(name, str):
        raise ValueError(f"{kind} must be given by name, one of {sorted(registry)}; got {type(name).__name__}")
    try:
        factory = registry[name.lower()]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}{closest(name, registry)}; choose one of {sorted(registry)}") from None
    accepted = parameters_of(factory)
    if accepted is not None:
        for key in params:
            if key not in accepted:
                raise ValueError(f"{kind} {name!r} has no parameter {key!r}{closest(key, accepted)}; its parameters: "
                                 f"{', '.join(accepted) or 'none'}")
    try:
        return factory(**params)
    except TypeError as exc:
        valid = f"; its parameters: {', '.join(accepted)}" if accepted else ""
        raise ValueError(f"bad parameters for {kind} {name!r}: {exc}{valid}") from None


def parameters_of(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword parameters `factory` takes, or None when it takes any (**kwargs) or cannot be inspected."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def closest(word: str, choices: Iterable[str], describe: Callable[[str], str] = repr) -> str:
    """" (did you mean X?)" for the choice closest to a mistyped `word`, or "" when none is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {describe(match[0])}?)" if match else ""


def dataclass_from_dict(cls: Callable[..., T], values: Mapping[str, Any], error: type[Exception], label: str = "",
                        describe: Callable[[str], str] = repr) -> T:
    """`cls(**values)` for a dataclass, refusing unknown keys (suggesting the closest known one) and values of
    the wrong type, by name. `label` prefixes the messages; `describe(field)` names a setting in them."""
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in sorted(set(values) - set(known), key=str):
        raise error(f"{label}unknown setting {key!r}{closest(key, known, describe)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        problem = type_problem(value, hints.get(key, Any))
        if problem is not None:
            raise error(f"{label}{describe(key)} {problem}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise error(f"{label}{exc}") from None


_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "a table",
          list: "a list"}


def type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the type annotation `hint` ("must be a number, got the string '0.1' ..."),
    or None when it fits. An int fits a float; a bool fits neither an int nor a float."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is Union else (hint,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is Any or (kind is type(None) and value is None):
            return None
        if isinstance(value, bool):
            if origin is bool:
                return None
        elif origin is float and isinstance(value, (int, float)):
            return None
        elif isinstance(origin, type) and isinstance(value, origin):
            return None
    if not all(isinstance(typing.get_origin(k) or k, type) for k in allowed):
        return None  # an annotation this check does not understand: leave it to the class
    wanted = " or ".join(_KINDS.get(typing.get_origin(k) or k, getattr(k, "__name__", str(k)))
                         for k in allowed if k is not type(None))
    got = f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({_KINDS.get(type(value), type(value).__name__)})"
    hint_text = ""
    if isinstance(value, str) and any(k in (int, float) for k in allowed):
        try:
            float(value)
            hint_text = " (write the number without quotes)"
        except ValueError:
            pass
    return f"must be {wanted}, got {got}{hint_text}"


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
