"""Typed, validated merging of JSON settings into the fakes' config dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """An unknown setting name or a value of the wrong type."""


def merge(config: T, updates: Mapping[str, Any]) -> T:
    """A copy of the dataclass `config` with `updates` applied, each checked against the field's type."""
    hints = typing.get_type_hints(type(config))
    for name, value in updates.items():
        if name not in hints:
            raise SettingsError(f"unknown setting {name!r}; known: {', '.join(sorted(hints))}")
        if not _conforms(value, hints[name]):
            raise SettingsError(f"setting {name!r} must be {hints[name]}, got {value!r}")
    return dataclasses.replace(config, **updates)  # type: ignore[type-var]


def as_json(config: object) -> dict[str, Any]:
    """The dataclass `config` as a JSON-ready dict."""
    return dataclasses.asdict(config)  # type: ignore[call-overload, no-any-return]


def _conforms(value: object, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_conforms(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is list:
        (item_type,) = typing.get_args(expected)
        return isinstance(value, list) and all(_conforms(item, item_type) for item in value)
    if origin is dict:
        key_type, value_type = typing.get_args(expected)
        return isinstance(value, dict) and all(
            _conforms(key, key_type) and _conforms(item, value_type) for key, item in value.items()
        )
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
