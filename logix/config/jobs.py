"""Config sections of the jobs around the logger (``logix run`` / ``extract`` / ``contribute``):
model, data, training, logging schedule, analysis and contribution.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from logix.config.choices import (
    CheckpointWeighting,
    ContributionMethod,
    DataFormat,
    IclControl,
    IdPolicy,
    ModelArch,
    ModelDtype,
    Pooling,
    PreconditionerType,
    ScoreColumn,
    ScoreMode,
    SelectorHead,
    TrainOn,
)
from logix.config.damping import Damping, default_damping
from logix.config.fields import (
    check_types,
    did_you_mean,
    help_field,
    non_negative_int,
    positive_int,
    probability,
    str_tuple,
)
from logix.errors import ConfigError


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA adapters added to the model before fine-tuning (``logix run``)."""

    enabled: bool = help_field("Wrap the model with PEFT LoRA adapters (logs the LoRA modules).", False)
    r: int = help_field("LoRA rank.", 8)
    alpha: int = help_field("LoRA alpha (scaling = alpha / r).", 16)
    dropout: float = help_field("LoRA dropout (0 keeps logged gradients deterministic).", 0.0)
    target_modules: tuple[str, ...] = help_field(
        "Module names to adapt; empty lets PEFT pick the architecture's defaults.", ()
    )

    def __post_init__(self) -> None:
        check_types(self, "model.lora.")
        positive_int(self.r, "model.lora.r")
        positive_int(self.alpha, "model.lora.alpha")
        probability(self.dropout, "model.lora.dropout")
        object.__setattr__(
            self, "target_modules", str_tuple(self.target_modules, "model.lora.target_modules")
        )


@dataclass(frozen=True)
class ModelConfig:
    """The model ``logix run`` loads (a hub name or path) or builds with seeded weights."""

    name: str = help_field(
        "Hub name or local path for from_pretrained (e.g. gpt2); empty builds `arch` from `arch_config`.", ""
    )
    arch: ModelArch = help_field("Architecture built when `name` is empty: gpt2 | llama.", ModelArch.GPT2)
    arch_config: Mapping[str, Any] = help_field(
        "Keyword arguments of the architecture's transformers config (e.g. {n_layer: 2, n_embd: 64}); "
        "vocab_size defaults to the tokenizer's.",
        default_factory=dict,
    )
    tokenizer: str = help_field("Tokenizer: a tokenizer.json file, a directory or a hub name; empty: `name`.", "")
    seed: int = help_field("Seed of the built model's random weights.", 0)
    dtype: ModelDtype = help_field("Dtype of the weights.", ModelDtype.FLOAT32)
    lora: LoraConfig = help_field("Optional LoRA adapters.", default_factory=LoraConfig)

    def __post_init__(self) -> None:
        check_types(self, "model.")
        if not isinstance(self.arch_config, Mapping):
            raise ConfigError(f"model.arch_config must be a mapping, got {self.arch_config!r}.")
        object.__setattr__(self, "arch_config", types.MappingProxyType(dict(self.arch_config)))


@dataclass(frozen=True)
class DataConfig:
    """The data ``logix run`` / ``logix extract`` read: JSONL files of records."""

    train: str = help_field("JSONL of training records (relative: to the cwd, else to the config's folder).", "")
    queries: str = help_field("JSONL of query records whose influence is explained; empty: none.", "")
    format: DataFormat = help_field("instruction | text.", DataFormat.INSTRUCTION)
    text_field: str = help_field("Field of the text (format: text).", "text")
    id_field: str = help_field("Field holding each record's id.", "id")
    ids: IdPolicy = help_field("auto | column | hash: where example ids come from.", IdPolicy.AUTO)
    category_field: str = help_field("Field used to group records in reports (optional in the data).", "category")
    max_length: int = help_field("Tokens per example; longer ones are truncated.", 128)
    train_on: TrainOn = help_field("response | all: which tokens of an instruction example carry loss.",
                                   TrainOn.RESPONSE)
    limit_train: int = help_field("Use only the first N training records (0: all).", 0)
    limit_queries: int = help_field("Use only the first N query records (0: all).", 0)

    def __post_init__(self) -> None:
        check_types(self, "data.")
        positive_int(self.max_length, "data.max_length")
        non_negative_int(self.limit_train, "data.limit_train")
        non_negative_int(self.limit_queries, "data.limit_queries")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning with the HuggingFace Trainer before / while logging (``logix run``)."""

    enabled: bool = help_field("Fine-tune the model; false logs the model as loaded (extraction only).", True)
    epochs: float = help_field("Training epochs.", 1.0)
    max_steps: int = help_field("Stop after this many optimizer steps (-1: use `epochs`).", -1)
    batch_size: int = help_field("Per-device train batch size.", 8)
    grad_accum: int = help_field("Gradient accumulation steps.", 1)
    lr: float = help_field("Peak learning rate.", 5e-4)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    warmup_ratio: float = help_field("Fraction of steps of linear warm-up.", 0.0)
    scheduler: str = help_field("transformers lr_scheduler_type (linear, cosine, constant, ...; checked by "
                                "transformers, whose list grows).", "linear")
    seed: int = help_field("Trainer seed (data order, dropout).", 0)

    def __post_init__(self) -> None:
        check_types(self, "train.")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be a positive number, got {self.epochs!r}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps must be -1 or a positive integer, got {self.max_steps!r}.")
        positive_int(self.batch_size, "train.batch_size")
        positive_int(self.grad_accum, "train.grad_accum")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}.")
        probability(self.warmup_ratio, "train.warmup_ratio")


@dataclass(frozen=True)
class LogScheduleConfig:
    """When the Trainer callback logs, and how it reads the data.

    At each named point the callback pauses training, logs every training example (and the
    queries) with the model as it is then, and resumes; the optimizer, gradients, RNG state and
    train/eval mode are restored exactly.
    """

    epochs: tuple[int, ...] = help_field("Log at the end of these epochs (1-based).", ())
    steps: tuple[int, ...] = help_field("Log after these optimizer steps.", ())
    every_n_steps: int = help_field("Also log every N optimizer steps (0: never).", 0)
    at_end: bool = help_field("Log when training ends (the final model).", True)
    at_start: bool = help_field("Log before the first step (the initial model).", False)
    batch_size: int = help_field("Examples per logging batch.", 8)
    max_examples: int = help_field("Log only the first N training examples (0: all).", 0)

    def __post_init__(self) -> None:
        check_types(self, "schedule.")
        for name in ("epochs", "steps"):
            values = getattr(self, name)
            if isinstance(values, int):
                values = (values,)
            if not isinstance(values, Sequence) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
            ):
                raise ConfigError(f"schedule.{name} must be a list of positive integers, got {values!r}.")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        non_negative_int(self.every_n_steps, "schedule.every_n_steps")
        positive_int(self.batch_size, "schedule.batch_size")
        non_negative_int(self.max_examples, "schedule.max_examples")


@dataclass(frozen=True)
class AnalysisConfig:
    """Influence scoring after logging (``logix run`` / ``logix influence``)."""

    enabled: bool = help_field("Score influence of the training rows on the queries after logging.", True)
    preconditioner: PreconditionerType = help_field("identity | raw | kfac | ekfac | raw-joint.",
                                                    PreconditionerType.KFAC)
    damping: float | None = help_field(
        "Damping added to the curvature (see `damping_relative`); null: the preconditioner's default "
        "(relative 0.1; raw-joint: relative 3).", None
    )
    damping_relative: bool = help_field("Damping is relative to each module's mean eigenvalue (when `damping` is set).", True)
    mode: ScoreMode = help_field("dot | cosine | relative | unit.", ScoreMode.DOT)
    top_k: int = help_field("Proponents and opponents kept per query.", 10)
    self_influence: bool = help_field("Also compute every training row's self-influence.", True)
    save_scores: bool = help_field("Write the full query x train score matrix to HDF5.", False)
    memory_budget_mb: float = help_field("Memory the scorer may use for train chunks.", 512.0)
    checkpoints: CheckpointWeighting = help_field(
        "lr | uniform | last: how scores of several logged checkpoints combine.", CheckpointWeighting.LR
    )
    full_space_run: str | None = help_field(
        "Asymmetric preconditioning (`logix influence`, mode dot): a `projection: none` run of the same model "
        "(its statistics hold `preconditioner`'s curvature, its queries are logged); queries are "
        "preconditioned there in full space, then projected like the train rows. null: off.", None
    )

    def __post_init__(self) -> None:
        check_types(self, "analysis.")
        positive_int(self.top_k, "analysis.top_k")
        if self.damping is not None and self.damping < 0:
            raise ConfigError(f"analysis.damping must be a finite number >= 0 or null, got {self.damping!r}.")
        if self.memory_budget_mb <= 0:
            raise ConfigError(f"analysis.memory_budget_mb must be positive, got {self.memory_budget_mb!r}.")
        if self.full_space_run is not None and self.mode is not ScoreMode.DOT:
            raise ConfigError("analysis.full_space_run (asymmetric preconditioning) scores in mode 'dot' only; "
                              f"got analysis.mode={self.mode!r}.")

    def resolved_damping(self):
        """The :class:`~logix.analysis.Damping` to use: ``damping`` / ``damping_relative``, or the
        preconditioner's default when ``damping`` is null."""
        if self.damping is None:
            return default_damping(self.preconditioner)
        return Damping(float(self.damping), self.damping_relative)


@dataclass(frozen=True)
class ContributionConfig:
    """Instruction-data contribution and selection (``logix contribute``)."""

    pool: str = help_field("Candidate pool: .jsonl / .json / datasets file or folder (default: data.train).", "")
    methods: tuple[ContributionMethod, ...] = help_field(
        "Scores to compute: icl | ifd | less | length | random (length and random are always added).",
        (ContributionMethod.ICL, ContributionMethod.IFD),
    )
    sample_size: int = help_field("Pool examples that get the model-based scores (0: all); the selector scores the rest.", 0)
    probes: str = help_field("Assessment set for icl / validation for less: a records file (default: data.queries, "
                        "else a stratified sample of the pool).", "")
    assessment_size: int = help_field("Probes drawn from the pool when no probe file is given.", 32)
    icl_control: IclControl = help_field("Random control of the icl score: chars | tokens | none.",
                                         IclControl.CHARS)
    batch_size: int = help_field("Sequences per forward pass of the scorers.", 8)
    max_length: int = help_field("Longest scored sequence in tokens (0: the model's limit).", 0)
    warmup_epochs: float = help_field("Fine-tune the model on the pool this long before scoring (the offline demo's "
                                 "seeded model needs it; 0 for a pretrained model).", 0.0)
    less_fraction: float = help_field("less: fraction of the pool the LoRA warm-up trains on.", 0.05)
    less_epochs: int = help_field("less: warm-up epochs (one logged checkpoint each).", 4)
    selector: SelectorHead = help_field("Head trained on the sample's scores to score the whole pool: ridge | "
                                        "logistic | mlp | lora | none.", SelectorHead.RIDGE)
    pooling: Pooling = help_field("Embedding of a record for the selector: mean | last.", Pooling.MEAN)
    holdout: float = help_field("Fraction of the scored sample held out to report the selector's quality.", 0.2)
    label_top_p: float = help_field("Positive class of logistic / lora selectors and of the reported AUC.", 0.1)
    select_by: ScoreColumn | None = help_field(
        "Score to select by: icl | ifd | less | length | random | icl_share_positive | icl_sigmoid "
        "(null: the first model-based method).", None)
    top_p: float = help_field("Fraction of the pool to select (ignored when top_k > 0).", 0.1)
    top_k: int = help_field("Number of examples to select (0: use top_p).", 0)
    seed: int = help_field("Seed of sampling, random controls and the random baseline.", 0)

    def __post_init__(self) -> None:
        check_types(self, "contribution.")
        methods = str_tuple(self.methods, "contribution.methods")
        valid = [m.value for m in ContributionMethod]
        for m in methods:
            if m not in valid:
                raise ConfigError(f"contribution.methods: unknown method {m!r}.{did_you_mean(m, valid)} "
                                  f"Valid: {', '.join(valid)}.")
        object.__setattr__(self, "methods", tuple(ContributionMethod(m) for m in methods))
        non_negative_int(self.sample_size, "contribution.sample_size")
        positive_int(self.assessment_size, "contribution.assessment_size")
        positive_int(self.batch_size, "contribution.batch_size")
        non_negative_int(self.max_length, "contribution.max_length")
        non_negative_int(self.top_k, "contribution.top_k")
        positive_int(self.less_epochs, "contribution.less_epochs")
        for key in ("holdout", "label_top_p", "less_fraction"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise ConfigError(f"contribution.{key} must be a fraction in (0, 1), got {value!r}.")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ConfigError(f"contribution.top_p must be a fraction in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.warmup_epochs, int | float) or self.warmup_epochs < 0:
            raise ConfigError(f"contribution.warmup_epochs must be >= 0, got {self.warmup_epochs!r}.")
