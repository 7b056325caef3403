"""Field helpers of the config dataclasses: help metadata, validators, strict building from data.

Validators raise :class:`~logix.errors.ConfigError` naming the key, the value and what is allowed;
:func:`build` collects every problem of one file so that they are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

import yaml

from logix.errors import ConfigError


def help_field(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with help text (shown in docs/configuration.md)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)



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
    hints = typing.get_type_hints(cls)
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
        else:
            kwargs[key] = value
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
        node[keys[-1]] = yaml.safe_load(raw)
    return data
