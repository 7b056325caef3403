"""Run configuration: frozen dataclasses are the single source of truth.

YAML and the command line only serialise these classes. Loading is strict: an
unknown key fails with the valid keys and a "did you mean" suggestion, an
unknown enum value lists the allowed values, and every problem found in one
file is reported in one error.

Example::

    cfg = Config.from_yaml("configs/logix.yaml", overrides=["projection.rank_in=32"])
    cfg.to_yaml("resolved.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from logix.errors import ConfigError


class _ChoiceEnum(str, enum.Enum):
    """A string enum whose parse error lists the valid choices."""

    @classmethod
    def parse(cls, value: Any, where: str = "") -> _ChoiceEnum:
        if isinstance(value, cls):
            return value
        choices = [m.value for m in cls]
        if isinstance(value, str) and value.lower() in choices:
            return cls(value.lower())
        label = f" for {where}" if where else ""
        raise ConfigError(f"Unknown value{label}: {value!r}. Choose between {choices}.")

    def __str__(self) -> str:
        return self.value


class ProjectionType(_ChoiceEnum):
    """How gradients are projected before they are stored."""

    RANDOM = "random"  # seeded Gaussian, entries N(0, 1/k): inner products unbiased
    PCA = "pca"  # top eigenvectors of the activation / output-gradient covariances
    NONE = "none"  # full per-example gradients (small models only)


class StoreDtype(_ChoiceEnum):
    """Element type of the stored rows."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class AccumDtype(_ChoiceEnum):
    """Element type used to accumulate statistics."""

    FLOAT64 = "float64"
    FLOAT32 = "float32"


class ComputeDtype(_ChoiceEnum):
    """Element type in which hooks project activations and gradients."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class DuplicatePolicy(_ChoiceEnum):
    """What to do when an id that this run already logged is logged again."""

    ERROR = "error"  # raise DuplicateIdError (default): never a silent overwrite
    SKIP = "skip"  # keep the first row, drop the new one (counted and reported)


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with help text (shown in docs/configuration.md)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(frozen=True)
class ProjectionConfig:
    """LoGra projection of activations (``P_in``) and output gradients (``P_out``)."""

    type: ProjectionType = _help("random | pca | none.", ProjectionType.RANDOM)
    rank_in: int = _help("k_in: projected size of the (bias-augmented) input activations.", 16)
    rank_out: int = _help("k_out: projected size of the output gradients.", 16)
    ranks: Mapping[str, tuple[int, int]] = _help(
        "Per-module overrides {glob: [rank_in, rank_out]}; the first matching glob wins.",
        default_factory=dict,
    )
    seed: int = _help("Seed of the random projection (mixed with each module's name).", 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ProjectionType.parse(self.type, "projection.type"))
        for name in ("rank_in", "rank_out"):
            _positive_int(getattr(self, name), f"projection.{name}")
        ranks = {}
        for pattern, pair in dict(self.ranks).items():
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise ConfigError(
                    f"projection.ranks[{pattern!r}] must be [rank_in, rank_out], got {pair!r}."
                )
            _positive_int(pair[0], f"projection.ranks[{pattern!r}][0]")
            _positive_int(pair[1], f"projection.ranks[{pattern!r}][1]")
            ranks[str(pattern)] = (int(pair[0]), int(pair[1]))
        object.__setattr__(self, "ranks", types.MappingProxyType(ranks))


@dataclass(frozen=True)
class CaptureConfig:
    """Which modules are captured, and how."""

    modules: tuple[str, ...] = _help(
        "Glob patterns of module names to capture; empty means every supported module.", ()
    )
    exclude: tuple[str, ...] = _help("Glob patterns of module names never captured.", ())
    types: tuple[str, ...] = _help(
        "Module kinds to capture (linear, conv1d, embedding, conv2d); empty means all.", ()
    )
    trainable_only: bool = _help(
        "Skip modules whose weight has requires_grad=False (e.g. frozen LoRA base layers).", True
    )
    per_token: bool = _help("Store one projected gradient per (unmasked) token instead of per example.", False)
    compute_dtype: ComputeDtype = _help("Dtype the hooks compute projections in.", ComputeDtype.FLOAT32)

    def __post_init__(self) -> None:
        for name in ("modules", "exclude", "types"):
            object.__setattr__(self, name, _str_tuple(getattr(self, name), f"capture.{name}"))
        object.__setattr__(
            self, "compute_dtype", ComputeDtype.parse(self.compute_dtype, "capture.compute_dtype")
        )


@dataclass(frozen=True)
class StatisticsConfig:
    """Running statistics collected while logging."""

    kfac: bool = _help("Activation (A) and output-gradient (S) covariances per module.", True)
    ekfac: bool = _help("EK-FAC eigenvalue corrections (adds a pass in the KFAC eigenbasis).", False)
    raw: bool = _help("Covariance of each module's logged (projected) gradient block.", False)
    raw_max_dim: int = _help("Refuse raw covariance for blocks larger than this (memory guard).", 4096)
    dtype: AccumDtype = _help("Accumulation dtype.", AccumDtype.FLOAT64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", AccumDtype.parse(self.dtype, "statistics.dtype"))
        _positive_int(self.raw_max_dim, "statistics.raw_max_dim")


@dataclass(frozen=True)
class StoreConfig:
    """On-disk layout of the logged rows."""

    dtype: StoreDtype = _help("Dtype of the stored rows.", StoreDtype.FLOAT32)
    shard_rows: int = _help("Rows per shard: a crash loses at most one uncommitted shard.", 1024)
    duplicate_ids: DuplicatePolicy = _help("error | skip, for an id logged twice.", DuplicatePolicy.ERROR)
    queue_shards: int = _help("Shards that may wait for the background writer (bounds memory).", 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", StoreDtype.parse(self.dtype, "store.dtype"))
        object.__setattr__(
            self, "duplicate_ids", DuplicatePolicy.parse(self.duplicate_ids, "store.duplicate_ids")
        )
        _positive_int(self.shard_rows, "store.shard_rows")
        _positive_int(self.queue_shards, "store.queue_shards")


@dataclass(frozen=True)
class Config:
    """Everything that defines a logix run."""

    root: str = _help("Directory under which each project gets its run directory.", "logix_runs")
    projection: ProjectionConfig = _help("LoGra projection.", default_factory=ProjectionConfig)
    capture: CaptureConfig = _help("Module selection and hook behaviour.", default_factory=CaptureConfig)
    statistics: StatisticsConfig = _help("Running statistics.", default_factory=StatisticsConfig)
    store: StoreConfig = _help("HDF5 store.", default_factory=StoreConfig)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
        """Build a config from plain data, strictly (unknown keys fail)."""
        data = _apply_overrides(dict(data or {}), overrides)
        errors: list[str] = []
        cfg = _build(cls, data, "", errors)
        if errors:
            raise ConfigError("Invalid logix config:\n  - " + "\n  - ".join(errors))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Config:
        """Load a YAML file with ``yaml.safe_load`` and validate it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}.")
        try:
            return cls.from_dict(data, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as strings, tuples as lists) that round-trips through YAML."""
        return _plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """The part of the config that fixes what the stored rows mean.

        Two runs may share a directory (resume) only when these agree; ``root``
        is excluded because it is where the run lives, not what it logs.
        """
        data = self.to_dict()
        data.pop("root")
        return data

    def rank_for(self, module_name: str) -> tuple[int, int]:
        """``(rank_in, rank_out)`` of a module, honouring ``projection.ranks`` globs."""
        from fnmatch import fnmatchcase

        for pattern, pair in self.projection.ranks.items():
            if fnmatchcase(module_name, pattern):
                return pair
        return self.projection.rank_in, self.projection.rank_out


# ---- helpers -------------------------------------------------------------------------


def _positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}.")


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}.")
    return tuple(value)


def _did_you_mean(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
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
                + _did_you_mean(str(key), list(fields))
            )
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", errors)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        errors.append(str(exc))
    except TypeError as exc:
        errors.append(f"{prefix or 'config'}: {exc}")
    return cls()


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return obj


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
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


def resolve_config(config: Config | Mapping[str, Any] | str | Path | None) -> Config:
    """Accept a Config, a mapping, a YAML path or None (defaults)."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return Config.from_dict(config)
    if isinstance(config, (str, Path)):
        return Config.from_yaml(config)
    raise ConfigError(
        f"config must be a Config, a mapping or a YAML path, got {type(config).__name__}."
    )


def config_reference() -> str:
    """Markdown tables of every config key, its default and its help (docs/configuration.md)."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines += [f"### `{section.name}`", "", section.metadata["help"], "",
                  "| key | default | meaning |", "|---|---|---|"]
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = yaml.safe_dump(_plain(getattr(defaults, f.name)), default_flow_style=True).strip()
            default = default.removesuffix("...").strip()
            meaning = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


