"""The root :class:`Config`: every section, YAML loading with overrides, the reference tables.

Example::

    cfg = Config.from_yaml("configs/logix.yaml", overrides=["projection.rank_in=32"])
    cfg.to_yaml("resolved.yaml")
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from logix.config.fields import apply_overrides, build, check_types, help_field, plain
from logix.config.jobs import (
    AnalysisConfig,
    ContributionConfig,
    DataConfig,
    LogScheduleConfig,
    ModelConfig,
    TrainConfig,
)
from logix.config.logger import CaptureConfig, ProjectionConfig, StatisticsConfig, StoreConfig
from logix.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """Everything that defines a logix run: one frozen dataclass per YAML section.

    Built from YAML with :meth:`from_yaml` (with ``key.sub=value`` overrides), from a mapping with
    :meth:`from_dict`, or by :func:`resolve_config`; loading is strict (an unknown key or value is a
    :class:`~logix.errors.ConfigError` listing the valid ones, every problem of a file in one
    message). The logger's sections (:data:`IDENTITY_SECTIONS`) fix what a stored row means; the
    others say what ``logix run`` / ``extract`` / ``contribute`` do around the logger. Every key,
    its default and its meaning: docs/configuration.md (:func:`config_reference`).

    Attributes:
        root: The directory under which each project gets its run directory.
        projection: LoGra projection.
        capture: Module selection and hook behaviour.
        statistics: Running statistics.
        store: The HDF5 store.
        model: The model of ``logix run`` (ignored by ``logix.init``).
        data: The data of ``logix run`` / ``logix extract``.
        train: Fine-tuning of ``logix run`` (HF Trainer).
        schedule: When the Trainer callback logs.
        analysis: Influence scoring after logging.
        contribution: Instruction-data contribution (``logix contribute``).
    """

    root: str = help_field("Directory under which each project gets its run directory.", "logix_runs")
    projection: ProjectionConfig = help_field("LoGra projection.", default_factory=ProjectionConfig)
    capture: CaptureConfig = help_field("Module selection and hook behaviour.", default_factory=CaptureConfig)
    statistics: StatisticsConfig = help_field("Running statistics.", default_factory=StatisticsConfig)
    store: StoreConfig = help_field("HDF5 store.", default_factory=StoreConfig)
    model: ModelConfig = help_field("Model of `logix run` (ignored by logix.init).", default_factory=ModelConfig)
    data: DataConfig = help_field("Data of `logix run` / `logix extract`.", default_factory=DataConfig)
    train: TrainConfig = help_field("Fine-tuning of `logix run` (HF Trainer).", default_factory=TrainConfig)
    schedule: LogScheduleConfig = help_field(
        "When the Trainer callback logs.", default_factory=LogScheduleConfig
    )
    analysis: AnalysisConfig = help_field("Influence scoring after logging.", default_factory=AnalysisConfig)
    contribution: ContributionConfig = help_field(
        "Instruction-data contribution and selection (`logix contribute`).", default_factory=ContributionConfig
    )

    def __post_init__(self) -> None:
        check_types(self, "")

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
        """Build a config from plain data, strictly (unknown keys fail)."""
        data = apply_overrides(dict(data or {}), overrides)
        errors: list[str] = []
        cfg = build(cls, data, "", errors)
        if errors:
            raise ConfigError("Invalid logix config:\n  - " + "\n  - ".join(errors))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Config:
        """Load a YAML file with ``yaml.safe_load`` and validate it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:  # one line naming the file and the place, not a traceback
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}.") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}.")
        try:
            return cls.from_dict(data, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as strings, tuples as lists) that round-trips through YAML."""
        return plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """The part of the config that fixes what the stored rows mean.

        Two runs may share a directory (resume) only when these agree: projection,
        capture, statistics and store. ``root`` is where the run lives, and the
        model / data / train / schedule / analysis sections say what a job does
        around the logger, not what a stored row means.
        """
        data = self.to_dict()
        return {key: data[key] for key in IDENTITY_SECTIONS}

    def rank_for(self, module_name: str) -> tuple[int, int]:
        """``(rank_in, rank_out)`` of a module, honouring ``projection.ranks`` globs."""
        from fnmatch import fnmatchcase

        for pattern, pair in self.projection.ranks.items():
            if fnmatchcase(module_name, pattern):
                return pair
        return self.projection.rank_in, self.projection.rank_out


IDENTITY_SECTIONS = ("projection", "capture", "statistics", "store")
"""The config sections that fix what a stored row means (:meth:`Config.identity`): a run resumes
in a directory only when they agree with the config it was started with."""


def resolve_config(config: Config | Mapping[str, Any] | str | Path | None) -> Config:
    """A :class:`Config` from whatever form one was given in.

    Args:
        config: A Config (returned as it is), a mapping (the YAML's structure), a YAML path, or
            None (every default).

    Returns:
        The config.

    Raises:
        ConfigError: The mapping or file is not a valid config (every problem in one message),
            or ``config`` is of another type.
    """
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
    lines: list[str] = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        if dataclasses.is_dataclass(cls):
            lines += _reference_section(cls, section.name, section.metadata["help"])
    return "\n".join(lines)


def _reference_section(cls: type, prefix: str, help_text: str) -> list[str]:
    lines = [f"### `{prefix}`", "", help_text, "", "| key | default | meaning |", "|---|---|---|"]
    nested = []
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((hints[f.name], f"{prefix}.{f.name}", f.metadata["help"]))
            continue
        default = yaml.safe_dump(plain(getattr(defaults, f.name)), default_flow_style=True).strip()
        default = default.removesuffix("...").strip()
        meaning = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{prefix}.{f.name}` | `{default}` | {meaning} |")
    lines.append("")
    for sub_cls, sub_prefix, sub_help in nested:
        lines += _reference_section(sub_cls, sub_prefix, sub_help)
    return lines
