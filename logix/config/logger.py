"""Config sections of the logger itself: projection, capture, statistics, store.

These four sections fix what a stored row means (:data:`logix.config.IDENTITY_SECTIONS`).
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from logix.config.choices import (
    MAX_EXPECTED_CLASSES,
    AccumDtype,
    ComputeDtype,
    DuplicatePolicy,
    FisherType,
    NonFinitePolicy,
    ProjectionType,
    StoreDtype,
)
from logix.config.fields import check_types, help_field, positive_int, str_tuple
from logix.errors import ConfigError


@dataclass(frozen=True)
class ProjectionConfig:
    """LoGra projection of activations (``P_in``) and output gradients (``P_out``)."""

    type: ProjectionType = help_field("random | pca | whitened | none.", ProjectionType.RANDOM)
    rank_in: int = help_field(
        "k_in: projected size of the (bias-augmented) input activations (capped at each module's size).", 16
    )
    rank_out: int = help_field("k_out: projected size of the output gradients (capped at each module's size).", 16)
    ranks: Mapping[str, tuple[int, int]] = help_field(
        "Per-module overrides {glob: [rank_in, rank_out]}; the first matching glob wins.",
        default_factory=dict,
    )
    seed: int = help_field("Seed of the random projection (mixed with each module's name).", 0)
    whiten_damping: float = help_field(
        "whitened: damping added to each covariance factor before whitening, relative to its mean "
        "eigenvalue (the factored damping of the KFAC inverse the stored rows approximate).", 0.01
    )

    def __post_init__(self) -> None:
        check_types(self, "projection.")
        if not self.whiten_damping > 0:
            raise ConfigError(f"projection.whiten_damping must be a positive number, got {self.whiten_damping!r}.")
        object.__setattr__(self, "whiten_damping", float(self.whiten_damping))
        for name in ("rank_in", "rank_out"):
            positive_int(getattr(self, name), f"projection.{name}")
        ranks = {}
        for pattern, pair in dict(self.ranks).items():
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise ConfigError(
                    f"projection.ranks[{pattern!r}] must be [rank_in, rank_out], got {pair!r}."
                )
            positive_int(pair[0], f"projection.ranks[{pattern!r}][0]")
            positive_int(pair[1], f"projection.ranks[{pattern!r}][1]")
            ranks[str(pattern)] = (int(pair[0]), int(pair[1]))
        object.__setattr__(self, "ranks", types.MappingProxyType(ranks))


@dataclass(frozen=True)
class CaptureConfig:
    """Which modules are captured, and how."""

    modules: tuple[str, ...] = help_field(
        "Glob patterns of module names to capture; empty means every supported module.", ()
    )
    exclude: tuple[str, ...] = help_field("Glob patterns of module names never captured.", ())
    types: tuple[str, ...] = help_field(
        "Module kinds to capture (linear, conv1d, embedding, conv2d); empty means all.", ()
    )
    trainable_only: bool = help_field(
        "Skip modules whose weight has requires_grad=False (e.g. frozen LoRA base layers).", True
    )
    per_token: bool = help_field("Store one projected gradient per (unmasked) token instead of per example.", False)
    compute_dtype: ComputeDtype = help_field("Dtype the hooks compute projections in.", ComputeDtype.FLOAT32)
    nonfinite: NonFinitePolicy = help_field(
        "error | skip, for a batch whose rows or statistics hold NaN / Inf (a NaN loss, an overflow): "
        "error refuses the batch naming the ids (nothing of it is kept); skip drops the non-finite "
        "examples, records their ids in run.json (skipped_nonfinite) and logs a warning.",
        NonFinitePolicy.ERROR,
    )

    def __post_init__(self) -> None:
        check_types(self, "capture.")
        for name in ("modules", "exclude", "types"):
            object.__setattr__(self, name, str_tuple(getattr(self, name), f"capture.{name}"))


@dataclass(frozen=True)
class StatisticsConfig:
    """Running statistics collected while logging."""

    kfac: bool = help_field("Activation (A) and output-gradient (S) covariances per module.", True)
    ekfac: bool = help_field("EK-FAC eigenvalue corrections (adds a pass in the KFAC eigenbasis).", False)
    raw: bool = help_field("Covariance of each module's logged (projected) gradient block.", False)
    raw_joint: bool = help_field(
        "Covariance of the whole logged row (every module's block concatenated): the statistic of the "
        "raw-joint preconditioner (float64, dim^2 entries).",
        False,
    )
    raw_max_dim: int = help_field(
        "Refuse raw covariance for blocks (raw) or whole rows (raw_joint) larger than this (memory guard).", 4096
    )
    dtype: AccumDtype = help_field("Accumulation dtype.", AccumDtype.FLOAT64)
    fisher: FisherType = help_field(
        "empirical | true | expected: curvature from the data's labels, from labels sampled from the "
        "model (the Gauss-Newton / true Fisher; adds statistics passes whose loss uses "
        "Pass.sample_labels), or from every class weighted by its probability (the exact GGN of a "
        "classifier; needs fisher_classes). The YAML booleans work too: true is the true Fisher, "
        "false the empirical one.",
        FisherType.EMPIRICAL,
    )
    fisher_classes: int = help_field(
        "With fisher: expected, the number of classes C of the classifier's output: the statistics "
        f"passes repeat the data loop C times (Pass.repeats), once per class (at most {MAX_EXPECTED_CLASSES}).",
        0,
    )

    fisher_samples: int = help_field(
        "With fisher: true, label draws per example: the statistics passes repeat the data loop this "
        "many times (Pass.repeats). More draws, less Monte-Carlo noise in the curvature.",
        1,
    )

    def __post_init__(self) -> None:
        check_types(self, "statistics.")
        positive_int(self.fisher_samples, "statistics.fisher_samples")
        positive_int(self.raw_max_dim, "statistics.raw_max_dim")
        if self.fisher is FisherType.EXPECTED:
            if self.fisher_classes < 2:
                raise ConfigError(
                    "statistics.fisher: expected needs statistics.fisher_classes, the number of classes of "
                    f"the model's output (>= 2), got {self.fisher_classes!r}."
                )
            if self.fisher_classes > MAX_EXPECTED_CLASSES:
                raise ConfigError(
                    f"statistics.fisher: expected enumerates every class (one backward pass per class and "
                    f"example); {self.fisher_classes} classes is above {MAX_EXPECTED_CLASSES} (a language "
                    "model's vocabulary is far too many). Use statistics.fisher: true with "
                    "fisher_samples label draws instead."
                )


@dataclass(frozen=True)
class StoreConfig:
    """On-disk layout of the logged rows."""

    dtype: StoreDtype = help_field(
        "Dtype of the stored rows: float32 | float16 | bfloat16, or quantized int8 | int4 (one "
        "scale per row and module; queries stay float32).", StoreDtype.FLOAT32)
    shard_rows: int = help_field("Rows per shard: a crash loses at most one uncommitted shard.", 1024)
    duplicate_ids: DuplicatePolicy = help_field("error | skip, for an id logged twice.", DuplicatePolicy.ERROR)
    queue_shards: int = help_field("Shards that may wait for the background writer (bounds memory).", 2)

    def __post_init__(self) -> None:
        check_types(self, "store.")
        positive_int(self.shard_rows, "store.shard_rows")
        positive_int(self.queue_shards, "store.queue_shards")
