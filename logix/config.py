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
    WHITENED = "whitened"  # random directions of the KFAC-whitened space: (A + d)^-1/2 R, (S + d)^-1/2 R
    NONE = "none"  # full per-example gradients (small models only)

    @property
    def needs_covariance(self) -> bool:
        """Whether the projection is built from a first pass's full-space covariances."""
        return self in (ProjectionType.PCA, ProjectionType.WHITENED)


class StoreDtype(_ChoiceEnum):
    """Element type of the stored rows."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"  # quantized: per-row, per-module absmax scale (logix.store.quant)
    INT4 = "int4"


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


class FisherType(_ChoiceEnum):
    """Which labels the curvature statistics (A, S, EK-FAC corrections, raw) come from."""

    EMPIRICAL = "empirical"  # the data's labels, in the logging pass itself (no extra pass)
    TRUE = "true"  # labels sampled from the model's predictions, in passes of their own (GGN)
    EXPECTED = "expected"  # every class enumerated, weighted by its probability: the exact GGN


# fisher: expected runs one backward pass per class and example; above this it is refused.
MAX_EXPECTED_CLASSES = 256


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

    type: ProjectionType = _help("random | pca | whitened | none.", ProjectionType.RANDOM)
    rank_in: int = _help(
        "k_in: projected size of the (bias-augmented) input activations (capped at each module's size).", 16
    )
    rank_out: int = _help("k_out: projected size of the output gradients (capped at each module's size).", 16)
    ranks: Mapping[str, tuple[int, int]] = _help(
        "Per-module overrides {glob: [rank_in, rank_out]}; the first matching glob wins.",
        default_factory=dict,
    )
    seed: int = _help("Seed of the random projection (mixed with each module's name).", 0)
    whiten_damping: float = _help(
        "whitened: damping added to each covariance factor before whitening, relative to its mean "
        "eigenvalue (the factored damping of the KFAC inverse the stored rows approximate).", 0.01
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ProjectionType.parse(self.type, "projection.type"))
        if not isinstance(self.whiten_damping, (int, float)) or isinstance(self.whiten_damping, bool) \
                or not self.whiten_damping > 0:
            raise ConfigError(f"projection.whiten_damping must be a positive number, got {self.whiten_damping!r}.")
        object.__setattr__(self, "whiten_damping", float(self.whiten_damping))
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
    raw_joint: bool = _help(
        "Covariance of the whole logged row (every module's block concatenated): the statistic of the "
        "raw-joint preconditioner (float64, dim^2 entries).",
        False,
    )
    raw_max_dim: int = _help(
        "Refuse raw covariance for blocks (raw) or whole rows (raw_joint) larger than this (memory guard).", 4096
    )
    dtype: AccumDtype = _help("Accumulation dtype.", AccumDtype.FLOAT64)
    fisher: FisherType = _help(
        "empirical | true | expected: curvature from the data's labels, from labels sampled from the "
        "model (the Gauss-Newton / true Fisher; adds statistics passes whose loss uses "
        "Pass.sample_labels), or from every class weighted by its probability (the exact GGN of a "
        "classifier; needs fisher_classes).",
        FisherType.EMPIRICAL,
    )
    fisher_classes: int = _help(
        "With fisher: expected, the number of classes C of the classifier's output: the statistics "
        f"passes repeat the data loop C times (Pass.repeats), once per class (at most {MAX_EXPECTED_CLASSES}).",
        0,
    )

    fisher_samples: int = _help(
        "With fisher: true, label draws per example: the statistics passes repeat the data loop this "
        "many times (Pass.repeats). More draws, less Monte-Carlo noise in the curvature.",
        1,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", AccumDtype.parse(self.dtype, "statistics.dtype"))
        object.__setattr__(self, "fisher", FisherType.parse(self.fisher, "statistics.fisher"))
        _positive_int(self.fisher_samples, "statistics.fisher_samples")
        _positive_int(self.raw_max_dim, "statistics.raw_max_dim")
        if self.fisher is FisherType.EXPECTED:
            if not isinstance(self.fisher_classes, int) or isinstance(self.fisher_classes, bool) or self.fisher_classes < 2:
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

    dtype: StoreDtype = _help(
        "Dtype of the stored rows: float32 | float16 | bfloat16, or quantized int8 | int4 (one "
        "scale per row and module; queries stay float32).", StoreDtype.FLOAT32)
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


class IdPolicy(_ChoiceEnum):
    """Where the per-example ids of a dataset come from."""

    AUTO = "auto"  # the id column when the data have one, else a hash of the tokens
    COLUMN = "column"  # the data's id column (error when absent)
    HASH = "hash"  # a stable hash of the example's tokens


class DataFormat(_ChoiceEnum):
    """How records of a JSONL file become token sequences."""

    INSTRUCTION = "instruction"  # {instruction, input, output}, Alpaca-style prompt; loss on the response
    TEXT = "text"  # {text}: plain language-model text; loss on every token


class ModelArch(_ChoiceEnum):
    """Architectures a seeded model can be built from a config (when ``model.name`` is empty)."""

    GPT2 = "gpt2"
    LLAMA = "llama"


class ModelDtype(_ChoiceEnum):
    """Dtype the model's weights are loaded in."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class CheckpointWeighting(_ChoiceEnum):
    """How the scores of several logged checkpoints combine (TracIn-style)."""

    LR = "lr"  # weight each checkpoint by its learning rate at logging time
    UNIFORM = "uniform"  # equal weights
    LAST = "last"  # only the last checkpoint


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA adapters added to the model before fine-tuning (``logix run``)."""

    enabled: bool = _help("Wrap the model with PEFT LoRA adapters (logs the LoRA modules).", False)
    r: int = _help("LoRA rank.", 8)
    alpha: int = _help("LoRA alpha (scaling = alpha / r).", 16)
    dropout: float = _help("LoRA dropout (0 keeps logged gradients deterministic).", 0.0)
    target_modules: tuple[str, ...] = _help(
        "Module names to adapt; empty lets PEFT pick the architecture's defaults.", ()
    )

    def __post_init__(self) -> None:
        _positive_int(self.r, "model.lora.r")
        _positive_int(self.alpha, "model.lora.alpha")
        _probability(self.dropout, "model.lora.dropout")
        object.__setattr__(
            self, "target_modules", _str_tuple(self.target_modules, "model.lora.target_modules")
        )


@dataclass(frozen=True)
class ModelConfig:
    """The model ``logix run`` loads (a hub name or path) or builds with seeded weights."""

    name: str = _help(
        "Hub name or local path for from_pretrained (e.g. gpt2); empty builds `arch` from `arch_config`.", ""
    )
    arch: ModelArch = _help("Architecture built when `name` is empty: gpt2 | llama.", ModelArch.GPT2)
    arch_config: Mapping[str, Any] = _help(
        "Keyword arguments of the architecture's transformers config (e.g. {n_layer: 2, n_embd: 64}); "
        "vocab_size defaults to the tokenizer's.",
        default_factory=dict,
    )
    tokenizer: str = _help("Tokenizer: a tokenizer.json file, a directory or a hub name; empty: `name`.", "")
    seed: int = _help("Seed of the built model's random weights.", 0)
    dtype: ModelDtype = _help("Dtype of the weights.", ModelDtype.FLOAT32)
    lora: LoraConfig = _help("Optional LoRA adapters.", default_factory=LoraConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", ModelArch.parse(self.arch, "model.arch"))
        object.__setattr__(self, "dtype", ModelDtype.parse(self.dtype, "model.dtype"))
        if not isinstance(self.arch_config, Mapping):
            raise ConfigError(f"model.arch_config must be a mapping, got {self.arch_config!r}.")
        object.__setattr__(self, "arch_config", types.MappingProxyType(dict(self.arch_config)))


@dataclass(frozen=True)
class DataConfig:
    """The data ``logix run`` / ``logix extract`` read: JSONL files of records."""

    train: str = _help("JSONL of training records (relative: to the cwd, else to the config's folder).", "")
    queries: str = _help("JSONL of query records whose influence is explained; empty: none.", "")
    format: DataFormat = _help("instruction | text.", DataFormat.INSTRUCTION)
    text_field: str = _help("Field of the text (format: text).", "text")
    id_field: str = _help("Field holding each record's id.", "id")
    ids: IdPolicy = _help("auto | column | hash: where example ids come from.", IdPolicy.AUTO)
    category_field: str = _help("Field used to group records in reports (optional in the data).", "category")
    max_length: int = _help("Tokens per example; longer ones are truncated.", 128)
    train_on: str = _help("response | all: which tokens of an instruction example carry loss.", "response")
    limit_train: int = _help("Use only the first N training records (0: all).", 0)
    limit_queries: int = _help("Use only the first N query records (0: all).", 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", DataFormat.parse(self.format, "data.format"))
        object.__setattr__(self, "ids", IdPolicy.parse(self.ids, "data.ids"))
        _positive_int(self.max_length, "data.max_length")
        _non_negative_int(self.limit_train, "data.limit_train")
        _non_negative_int(self.limit_queries, "data.limit_queries")
        if self.train_on not in ("response", "all"):
            raise ConfigError(f"Unknown value for data.train_on: {self.train_on!r}. Choose between ['response', 'all'].")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning with the HuggingFace Trainer before / while logging (``logix run``)."""

    enabled: bool = _help("Fine-tune the model; false logs the model as loaded (extraction only).", True)
    epochs: float = _help("Training epochs.", 1.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1: use `epochs`).", -1)
    batch_size: int = _help("Per-device train batch size.", 8)
    grad_accum: int = _help("Gradient accumulation steps.", 1)
    lr: float = _help("Peak learning rate.", 5e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    warmup_ratio: float = _help("Fraction of steps of linear warm-up.", 0.0)
    scheduler: str = _help("transformers lr_scheduler_type (linear, cosine, constant, ...).", "linear")
    seed: int = _help("Trainer seed (data order, dropout).", 0)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, (int, float)) or self.epochs <= 0:
            raise ConfigError(f"train.epochs must be a positive number, got {self.epochs!r}.")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps must be -1 or a positive integer, got {self.max_steps!r}.")
        _positive_int(self.batch_size, "train.batch_size")
        _positive_int(self.grad_accum, "train.grad_accum")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}.")
        _probability(self.warmup_ratio, "train.warmup_ratio")


@dataclass(frozen=True)
class LogScheduleConfig:
    """When the Trainer callback logs, and how it reads the data.

    At each named point the callback pauses training, logs every training example (and the
    queries) with the model as it is then, and resumes; the optimizer, gradients, RNG state and
    train/eval mode are restored exactly.
    """

    epochs: tuple[int, ...] = _help("Log at the end of these epochs (1-based).", ())
    steps: tuple[int, ...] = _help("Log after these optimizer steps.", ())
    every_n_steps: int = _help("Also log every N optimizer steps (0: never).", 0)
    at_end: bool = _help("Log when training ends (the final model).", True)
    at_start: bool = _help("Log before the first step (the initial model).", False)
    batch_size: int = _help("Examples per logging batch.", 8)
    max_examples: int = _help("Log only the first N training examples (0: all).", 0)

    def __post_init__(self) -> None:
        for name in ("epochs", "steps"):
            values = getattr(self, name)
            if isinstance(values, int):
                values = (values,)
            if not isinstance(values, Sequence) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
            ):
                raise ConfigError(f"schedule.{name} must be a list of positive integers, got {values!r}.")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        _non_negative_int(self.every_n_steps, "schedule.every_n_steps")
        _positive_int(self.batch_size, "schedule.batch_size")
        _non_negative_int(self.max_examples, "schedule.max_examples")


@dataclass(frozen=True)
class AnalysisConfig:
    """Influence scoring after logging (``logix run`` / ``logix influence``)."""

    enabled: bool = _help("Score influence of the training rows on the queries after logging.", True)
    preconditioner: str = _help("identity | raw | kfac | ekfac | raw-joint.", "kfac")
    damping: float | None = _help(
        "Damping added to the curvature (see `damping_relative`); null: the preconditioner's default "
        "(relative 0.1; raw-joint: relative 3).", None
    )
    damping_relative: bool = _help("Damping is relative to each module's mean eigenvalue (when `damping` is set).", True)
    mode: str = _help("dot | cosine | relative | unit.", "dot")
    top_k: int = _help("Proponents and opponents kept per query.", 10)
    self_influence: bool = _help("Also compute every training row's self-influence.", True)
    save_scores: bool = _help("Write the full query x train score matrix to HDF5.", False)
    memory_budget_mb: float = _help("Memory the scorer may use for train chunks.", 512.0)
    checkpoints: CheckpointWeighting = _help(
        "lr | uniform | last: how scores of several logged checkpoints combine.", CheckpointWeighting.LR
    )
    full_space_run: str | None = _help(
        "Asymmetric preconditioning (`logix influence`, mode dot): a `projection: none` run of the same model "
        "(its statistics hold `preconditioner`'s curvature, its queries are logged); queries are "
        "preconditioned there in full space, then projected like the train rows. null: off.", None
    )

    def __post_init__(self) -> None:
        from logix.analysis.influence import ScoreMode
        from logix.analysis.precondition import PreconditionerType

        PreconditionerType.parse(self.preconditioner, "analysis.preconditioner")
        ScoreMode.parse(self.mode, "analysis.mode")
        object.__setattr__(
            self, "checkpoints", CheckpointWeighting.parse(self.checkpoints, "analysis.checkpoints")
        )
        _positive_int(self.top_k, "analysis.top_k")
        if self.damping is not None and (isinstance(self.damping, bool) or not isinstance(self.damping, (int, float))
                                         or self.damping < 0):
            raise ConfigError(f"analysis.damping must be a number >= 0 or null, got {self.damping!r}.")
        if not isinstance(self.memory_budget_mb, (int, float)) or self.memory_budget_mb <= 0:
            raise ConfigError(f"analysis.memory_budget_mb must be positive, got {self.memory_budget_mb!r}.")
        if self.full_space_run is not None and not isinstance(self.full_space_run, str):
            raise ConfigError(f"analysis.full_space_run must be a run directory (string) or null, got "
                              f"{self.full_space_run!r}.")
        if self.full_space_run is not None and ScoreMode.parse(self.mode) is not ScoreMode.DOT:
            raise ConfigError("analysis.full_space_run (asymmetric preconditioning) scores in mode 'dot' only; "
                              f"got analysis.mode={self.mode!r}.")

    def resolved_damping(self):
        """The :class:`~logix.analysis.Damping` to use: ``damping`` / ``damping_relative``, or the
        preconditioner's default when ``damping`` is null."""
        from logix.analysis.precondition import Damping, default_damping

        if self.damping is None:
            return default_damping(self.preconditioner)
        return Damping(float(self.damping), self.damping_relative)


@dataclass(frozen=True)
class ContributionConfig:
    """Instruction-data contribution and selection (``logix contribute``)."""

    pool: str = _help("Candidate pool: .jsonl / .json / datasets file or folder (default: data.train).", "")
    methods: tuple[str, ...] = _help(
        "Scores to compute: icl | ifd | less | length | random (length and random are always added).",
        ("icl", "ifd"),
    )
    sample_size: int = _help("Pool examples that get the model-based scores (0: all); the selector scores the rest.", 0)
    probes: str = _help("Assessment set for icl / validation for less: a records file (default: data.queries, "
                        "else a stratified sample of the pool).", "")
    assessment_size: int = _help("Probes drawn from the pool when no probe file is given.", 32)
    icl_control: str = _help("Random control of the icl score: chars | tokens | none.", "chars")
    batch_size: int = _help("Sequences per forward pass of the scorers.", 8)
    max_length: int = _help("Longest scored sequence in tokens (0: the model's limit).", 0)
    warmup_epochs: float = _help("Fine-tune the model on the pool this long before scoring (the offline demo's "
                                 "seeded model needs it; 0 for a pretrained model).", 0.0)
    less_fraction: float = _help("less: fraction of the pool the LoRA warm-up trains on.", 0.05)
    less_epochs: int = _help("less: warm-up epochs (one logged checkpoint each).", 4)
    selector: str = _help("Head trained on the sample's scores to score the whole pool: ridge | logistic | mlp "
                          "| lora | none.", "ridge")
    pooling: str = _help("Embedding of a record for the selector: mean | last.", "mean")
    holdout: float = _help("Fraction of the scored sample held out to report the selector's quality.", 0.2)
    label_top_p: float = _help("Positive class of logistic / lora selectors and of the reported AUC.", 0.1)
    select_by: str = _help("Score to select by (default: the first model-based method).", "")
    top_p: float = _help("Fraction of the pool to select (ignored when top_k > 0).", 0.1)
    top_k: int = _help("Number of examples to select (0: use top_p).", 0)
    seed: int = _help("Seed of sampling, random controls and the random baseline.", 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", _str_tuple(self.methods, "contribution.methods"))
        valid = ("icl", "ifd", "less", "length", "random")
        for m in self.methods:
            if m not in valid:
                raise ConfigError(f"contribution.methods: unknown method {m!r}.{_did_you_mean(m, valid)} "
                                  f"Valid: {', '.join(valid)}.")
        choices = {"icl_control": ("chars", "tokens", "none"), "pooling": ("mean", "last"),
                   "selector": ("ridge", "logistic", "mlp", "lora", "none")}
        for key, valid_values in choices.items():
            if getattr(self, key) not in valid_values:
                raise ConfigError(f"contribution.{key} must be one of {', '.join(valid_values)}, "
                                  f"got {getattr(self, key)!r}.")
        _non_negative_int(self.sample_size, "contribution.sample_size")
        _positive_int(self.assessment_size, "contribution.assessment_size")
        _positive_int(self.batch_size, "contribution.batch_size")
        _non_negative_int(self.max_length, "contribution.max_length")
        _non_negative_int(self.top_k, "contribution.top_k")
        _positive_int(self.less_epochs, "contribution.less_epochs")
        for key in ("holdout", "label_top_p", "less_fraction"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise ConfigError(f"contribution.{key} must be a fraction in (0, 1), got {value!r}.")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ConfigError(f"contribution.top_p must be a fraction in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.warmup_epochs, int | float) or self.warmup_epochs < 0:
            raise ConfigError(f"contribution.warmup_epochs must be >= 0, got {self.warmup_epochs!r}.")


@dataclass(frozen=True)
class Config:
    """Everything that defines a logix run."""

    root: str = _help("Directory under which each project gets its run directory.", "logix_runs")
    projection: ProjectionConfig = _help("LoGra projection.", default_factory=ProjectionConfig)
    capture: CaptureConfig = _help("Module selection and hook behaviour.", default_factory=CaptureConfig)
    statistics: StatisticsConfig = _help("Running statistics.", default_factory=StatisticsConfig)
    store: StoreConfig = _help("HDF5 store.", default_factory=StoreConfig)
    model: ModelConfig = _help("Model of `logix run` (ignored by logix.init).", default_factory=ModelConfig)
    data: DataConfig = _help("Data of `logix run` / `logix extract`.", default_factory=DataConfig)
    train: TrainConfig = _help("Fine-tuning of `logix run` (HF Trainer).", default_factory=TrainConfig)
    schedule: LogScheduleConfig = _help(
        "When the Trainer callback logs.", default_factory=LogScheduleConfig
    )
    analysis: AnalysisConfig = _help("Influence scoring after logging.", default_factory=AnalysisConfig)
    contribution: ContributionConfig = _help(
        "Instruction-data contribution and selection (`logix contribute`).", default_factory=ContributionConfig
    )

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


# ---- helpers -------------------------------------------------------------------------


def _positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}.")


def _non_negative_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be an integer >= 0, got {value!r}.")


def _probability(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{where} must be a number in [0, 1), got {value!r}.")


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
        default = yaml.safe_dump(_plain(getattr(defaults, f.name)), default_flow_style=True).strip()
        default = default.removesuffix("...").strip()
        meaning = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{prefix}.{f.name}` | `{default}` | {meaning} |")
    lines.append("")
    for sub_cls, sub_prefix, sub_help in nested:
        lines += _reference_section(sub_cls, sub_prefix, sub_help)
    return lines
