"""Checks every frozen config runs at construction: a wrong type or a value out of range is a
:class:`~fxcompress.errors.ConfigError` naming the class and the field, before any work starts.

Example:
    >>> from fxcompress import CompressConfig
    >>> CompressConfig(q="0.5")                                          # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxcompress.errors.ConfigError: CompressConfig.q must be float, got '0.5' (str)
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import types
import typing
from typing import Any

from fxcompress.errors import ConfigError


def check_fields(config: Any) -> None:
    """Every field of the dataclass ``config`` must match its annotation; floats must not be NaN."""
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, hints[field.name]):
            raise ConfigError(f"{type(config).__name__}.{field.name} must be {_describe(hints[field.name])}, "
                              f"got {value!r} ({type(value).__name__})")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluated once per class: configs are built often (each RMT-KD round)


def check_range(config: Any, name: str, low: float | None = None, high: float | None = None, *,
                open_low: bool = False, open_high: bool = False) -> None:
    """``config.name`` (unless None) must lie between ``low`` and ``high`` (open ends where told)."""
    value = getattr(config, name)
    if value is None:
        return
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        left = "(-∞" if low is None else ("(" if open_low else "[") + f"{low}"
        right = "∞)" if high is None else f"{high}" + (")" if open_high else "]")
        raise ConfigError(f"{type(config).__name__}.{name} must lie in {left}, {right}, got {value!r}")


def require_instance(value: Any, cls: type, what: str) -> None:
    """``value`` must be a ``cls`` (a config object, say, not a dict or a string)."""
    if not isinstance(value, cls):
        raise ConfigError(f"{what} must be a {cls.__name__}, got {type(value).__name__}: build one, "
                          f"e.g. {cls.__name__}(...)")


def require_reiterable(data: Any, what: str) -> None:
    """``data`` must be an iterable that can be read more than once (a list, a DataLoader)."""
    if data is None or isinstance(data, (str, bytes)) or not isinstance(data, collections.abc.Iterable):
        raise ConfigError(f"{what} must be an iterable of batches (a list, a DataLoader), got {type(data).__name__}")
    if iter(data) is data:
        raise ConfigError(f"{what} is a one-shot iterator ({type(data).__name__}): it is read more than once (to "
                          "count the batches, then every epoch or round), so pass a list of batches or a DataLoader")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return _is_number(value) and not (isinstance(value, float) and math.isnan(value))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (collections.abc.Mapping, dict):
        return isinstance(value, collections.abc.Mapping) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a tuple of {_describe(args[0])}"
    if origin in (collections.abc.Mapping, dict):
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return getattr(hint, "__name__", str(hint))
