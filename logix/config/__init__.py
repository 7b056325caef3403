"""Run configuration: frozen dataclasses are the single source of truth.

YAML and the command line only serialise these classes. Loading is strict: an unknown key fails
with the valid keys and a "did you mean" suggestion, an unknown enum value lists the allowed
values, and every problem found in one file is reported in one error.

``choices`` holds every vocabulary (enums), ``fields`` the validators, ``logger`` the sections
that fix what a stored row means, ``jobs`` the sections of ``logix run`` / ``contribute``, and
``root`` the :class:`Config` with YAML loading.
"""

from logix.config.choices import (
    MAX_EXPECTED_CLASSES,
    AccumDtype,
    CheckpointWeighting,
    ChoiceEnum,
    ComputeDtype,
    ContributionMethod,
    DataFormat,
    DuplicatePolicy,
    FisherType,
    IclControl,
    IdPolicy,
    IndexKind,
    LossReduction,
    ModelArch,
    ModelDtype,
    Pooling,
    PreconditionerType,
    ProjectionType,
    ScoreMode,
    SelectorHead,
    StoreDtype,
    TrainOn,
)
from logix.config.damping import DEFAULT_DAMPING, Damping, default_damping
from logix.config.jobs import (
    AnalysisConfig,
    ContributionConfig,
    DataConfig,
    LogScheduleConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from logix.config.logger import CaptureConfig, ProjectionConfig, StatisticsConfig, StoreConfig
from logix.config.root import IDENTITY_SECTIONS, Config, config_reference, resolve_config

__all__ = [
    "DEFAULT_DAMPING",
    "IDENTITY_SECTIONS",
    "MAX_EXPECTED_CLASSES",
    "AccumDtype",
    "AnalysisConfig",
    "CaptureConfig",
    "CheckpointWeighting",
    "ChoiceEnum",
    "ComputeDtype",
    "Config",
    "ContributionConfig",
    "ContributionMethod",
    "DataConfig",
    "DataFormat",
    "Damping",
    "DuplicatePolicy",
    "FisherType",
    "IclControl",
    "IdPolicy",
    "LogScheduleConfig",
    "LossReduction",
    "LoraConfig",
    "ModelArch",
    "ModelConfig",
    "ModelDtype",
    "Pooling",
    "PreconditionerType",
    "ProjectionConfig",
    "ProjectionType",
    "IndexKind",
    "ScoreMode",
    "SelectorHead",
    "StatisticsConfig",
    "StoreConfig",
    "StoreDtype",
    "TrainConfig",
    "TrainOn",
    "config_reference",
    "default_damping",
    "resolve_config",
]
