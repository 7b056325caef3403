"""Field helpers of the config dataclasses: help metadata, validators, strict building from data.

Validators raise :class:`~logix.errors.ConfigError` naming the key, the value and what is allowed;
:func:`build` collects every problem of one file so that they are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

import yaml

from logix.config.choices import ChoiceEnum
from logix.errors import ConfigError


def help_field(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with help text (shown in docs/configuration.md)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


# ---- strict types: a field annotated bool takes a bool, int an int, float a finite number ----------
def _describe(value: Any) -> str:
    if isinstance(value, str):
        hint = " (YAML reads only unquoted true / false as booleans)" if value.lower() in _BOOL_WORDS else ""
        return f"{value!r} (a string){hint}"
    return f"{value!r} ({type(value).__name__})"


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "1", "0"}


def check_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` if it has the annotated type ``hint`` (enums parsed to their member), else a
    :class:`~logix.errors.ConfigError` naming ``where``. Containers, mappings and sections are
    checked by their own section."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        optional_choice = len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], ChoiceEnum)
        if type(None) in args and (value is None or (optional_choice and value == "")):
            return None  # "" also means null for an optional choice (select_by: '' was its default)
        if len(inner) != 1:
            return value
        try:
            return check_value(inner[0], value, where)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(", got ", " (or null), got ", 1)) from None
    if hint is bool:
        if type(value) is not bool:
            raise ConfigError(f"{where} must be true or false (a YAML boolean), got {_describe(value)}.")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_describe(value)}.")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {_describe(value)}.")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_describe(value)}.")
    elif isinstance(hint, type) and issubclass(hint, ChoiceEnum):
        return hint.parse(value, where)
    elif dataclasses.is_dataclass(hint) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be a {hint.__name__} section, got {_describe(value)}.")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(obj: Any, prefix: str) -> None:
    """Check (and normalise: enums parsed) every field of a config section against its annotation;
    call it first in the section's ``__post_init__``. ``prefix`` names the section (``capture.``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(hints[f.name], value, prefix + f.name)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}.")


def non_negative_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be an integer >= 0, got {value!r}.")


def probability(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{where} must be a number in [0, 1), got {value!r}.")


def str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}.")
    return tuple(value)


def did_you_mean(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(data, Mapping):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}.")
        return cls()
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            errors.append(
                f"Unknown key {prefix + str(key)!r}. Valid keys: {sorted(fields)}."
                + did_you_mean(str(key), list(fields))
            )
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, f"{prefix}{key}.", errors)
            continue
        try:
            kwargs[key] = check_value(hint, value, prefix + str(key))
        except ConfigError as exc:  # reported with the file's other problems; the key keeps its default
            errors.append(str(exc))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        errors.append(str(exc))
    except TypeError as exc:
        errors.append(f"{prefix or 'config'}: {exc}")
    return cls()


def plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [plain(v) for v in obj]
    return obj


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key.sub=value.")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"Override {item!r}: {key!r} is not a section.")
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override {item!r}: its value is not valid YAML ({getattr(exc, 'problem', exc)}).") from None
    return data
