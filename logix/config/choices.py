"""Every vocabulary of logix's configuration, as string enums (one place, one definition).

Inside the code modes are these enums (``PreconditionerType.EKFAC``); strings exist only at the
YAML / CLI edge, where :meth:`ChoiceEnum.parse` turns them into members or raises a
:class:`~logix.errors.ConfigError` listing the valid choices.
"""

from __future__ import annotations

import enum
from typing import Any

from logix.errors import ConfigError


class ChoiceEnum(str, enum.Enum):
    """A string enum whose parse error lists the valid choices."""

    @classmethod
    def parse(cls, value: Any, where: str = "") -> ChoiceEnum:
        if isinstance(value, cls):
            return value
        choices = [m.value for m in cls]
        if isinstance(value, str) and value.lower() in choices:
            return cls(value.lower())
        if isinstance(value, bool) and cls._from_bool(value) is not None:
            return cls._from_bool(value)
        label = f" for {where}" if where else ""
        hint = " (a YAML boolean: quote the value)" if isinstance(value, bool) else ""
        raise ConfigError(f"Unknown value{label}: {value!r}{hint}. Choose between {choices}.")

    @classmethod
    def _from_bool(cls, value: bool) -> ChoiceEnum | None:
        """The member a YAML boolean stands for (None: booleans are not a value of this choice)."""
        return None

    def __str__(self) -> str:
        return self.value


class ProjectionType(ChoiceEnum):
    """How gradients are projected before they are stored."""

    ORTHOGONAL = "orthogonal"  # seeded random orthonormal directions x sqrt(d/k): unbiased, exact when k = d
    RANDOM = "random"  # seeded Gaussian, entries N(0, 1/k): inner products unbiased
    PCA = "pca"  # top eigenvectors of the activation / output-gradient covariances
    WHITENED = "whitened"  # random directions of the KFAC-whitened space: (A + d)^-1/2 R, (S + d)^-1/2 R
    NONE = "none"  # full per-example gradients (small models only)

    @property
    def needs_covariance(self) -> bool:
        """Whether the projection is built from a first pass's full-space covariances."""
        return self in (ProjectionType.PCA, ProjectionType.WHITENED)

    @property
    def is_seeded(self) -> bool:
        """Whether the projection is drawn from the seed alone (random, orthogonal), before any pass."""
        return self in (ProjectionType.RANDOM, ProjectionType.ORTHOGONAL)


class StoreDtype(ChoiceEnum):
    """Element type of the stored rows."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"  # quantized: per-row, per-module absmax scale (logix.store.quant)
    INT4 = "int4"


class AccumDtype(ChoiceEnum):
    """Element type used to accumulate statistics."""

    FLOAT64 = "float64"
    FLOAT32 = "float32"


class ComputeDtype(ChoiceEnum):
    """Element type in which hooks project activations and gradients."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class FisherType(ChoiceEnum):
    """Which labels the curvature statistics (A, S, EK-FAC corrections, raw) come from."""

    EMPIRICAL = "empirical"  # the data's labels, in the logging pass itself (no extra pass)
    TRUE = "true"  # labels sampled from the model's predictions, in passes of their own (GGN)
    EXPECTED = "expected"  # every class enumerated, weighted by its probability: the exact GGN

    @classmethod
    def _from_bool(cls, value: bool) -> FisherType:
        # ``fisher: true`` (a YAML boolean) is the true Fisher; ``fisher: false`` the empirical one
        return cls.TRUE if value else cls.EMPIRICAL


# fisher: expected runs one backward pass per class and example; above this it is refused.
MAX_EXPECTED_CLASSES = 256
"""The most classes ``statistics.fisher: expected`` accepts (its passes run once per class)."""


class LossReduction(ChoiceEnum):
    """How the loss differentiated inside ``with run(...)`` reduces over the batch's examples."""

    SUM = "sum"  # a sum over examples: each example's gradient as it is (no rescaling)
    MEAN = "mean"  # a mean over the batch's examples: captured gradients are multiplied by the batch size


class DuplicatePolicy(ChoiceEnum):
    """What to do when an id that this run already logged is logged again."""

    ERROR = "error"  # raise DuplicateIdError (default): never a silent overwrite
    SKIP = "skip"  # keep the first row, drop the new one (counted and reported)


class NonFinitePolicy(ChoiceEnum):
    """What to do with a batch whose rows or statistics hold NaN / Inf (capture.nonfinite)."""

    ERROR = "error"  # raise BatchError naming the ids (default); nothing of the batch is kept
    SKIP = "skip"  # drop the non-finite examples (ids recorded in run.json), keep the rest


class IdPolicy(ChoiceEnum):
    """Where the per-example ids of a dataset come from."""

    AUTO = "auto"  # the id column when the data have one, else a hash of the tokens
    COLUMN = "column"  # the data's id column (error when absent)
    HASH = "hash"  # a stable hash of the example's tokens


class DataFormat(ChoiceEnum):
    """How records of a JSONL file become token sequences."""

    INSTRUCTION = "instruction"  # {instruction, input, output}, Alpaca-style prompt; loss on the response
    TEXT = "text"  # {text}: plain language-model text; loss on every token


class ModelArch(ChoiceEnum):
    """Architectures a seeded model can be built from a config (when ``model.name`` is empty)."""

    GPT2 = "gpt2"
    LLAMA = "llama"


class ModelDtype(ChoiceEnum):
    """Dtype the model's weights are loaded in."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class CheckpointWeighting(ChoiceEnum):
    """How the scores of several logged checkpoints combine (TracIn-style)."""

    LR = "lr"  # weight each checkpoint by its learning rate at logging time
    UNIFORM = "uniform"  # equal weights
    LAST = "last"  # only the last checkpoint


class PreconditionerType(ChoiceEnum):
    """How train and query rows are preconditioned before their inner product."""

    IDENTITY = "identity"  # plain dot products of the logged rows
    RAW = "raw"  # each module's logged-block covariance
    KFAC = "kfac"  # Kronecker factors A, S
    EKFAC = "ekfac"  # KFAC eigenbasis with eigenvalue corrections
    RAW_JOINT = "raw-joint"  # covariance of the whole logged row
    AUTO = "auto"  # the best curvature the run logged: ekfac, else kfac, else identity


class IndexKind(ChoiceEnum):
    """The faiss index behind approximate top-k (``logix index --kind``)."""

    AUTO = "auto"  # ivfpq, or hnswsq4 (reduced) where ivfpq's measured recall@10 is under 0.9
    FLAT = "flat"  # exact inner products over float32 vectors (4 B per value)
    IVFFLAT = "ivfflat"  # inverted lists of float32 vectors: scans nprobe of nlist lists
    IVFSQ8 = "ivfsq8"  # inverted lists of 8-bit scalar-quantized vectors (1 B per value)
    IVFPQ = "ivfpq"  # inverted lists of product-quantized codes (m bytes per row at 8 bits)
    HNSW = "hnsw"  # a graph over float32 vectors, searched by inner product
    HNSWSQ4 = "hnswsq4"  # the same graph over 4-bit scalar-quantized vectors (half a byte per value)


class ScoreMode(ChoiceEnum):
    """How an influence score is normalised."""

    DOT = "dot"  # g_q^T H^-1 g_t
    COSINE = "cosine"  # dot / (||g_q||_H ||g_t||_H), the cosine in the H^-1 metric
    RELATIVE = "relative"  # RelatIF: dot / ||g_t||_H
    UNIT = "unit"  # gradients scaled to unit Euclidean norm before preconditioning


class TrainOn(ChoiceEnum):
    """Which tokens of an instruction example carry loss."""

    RESPONSE = "response"
    ALL = "all"


class ContributionMethod(ChoiceEnum):
    """Instruction-data contribution scores (``logix contribute``)."""

    ICL = "icl"  # in-context contribution (gradient-free)
    IFD = "ifd"  # instruction-following difficulty
    LESS = "less"  # gradient cosine with the validation subtasks (LoRA warm-up)
    LENGTH = "length"  # response length (baseline)
    RANDOM = "random"  # random scores (baseline)


class ScoreColumn(ChoiceEnum):
    """A score column of ``logix contribute`` that selection can rank by (contribution.select_by)."""

    ICL = "icl"
    IFD = "ifd"
    LESS = "less"
    LENGTH = "length"
    RANDOM = "random"
    ICL_SHARE_POSITIVE = "icl_share_positive"  # share of the probes the demonstration helps
    ICL_SIGMOID = "icl_sigmoid"  # mean bounded (sigmoid-mapped) contribution over the probes


class IclControl(ChoiceEnum):
    """The random control of the in-context score."""

    CHARS = "chars"  # a random demonstration of the same number of characters
    TOKENS = "tokens"  # ... of the same number of tokens
    NONE = "none"  # no control: the raw perplexity drop


class Pooling(ChoiceEnum):
    """How a record's hidden states become one embedding for the selector."""

    MEAN = "mean"
    LAST = "last"


class SelectorHead(ChoiceEnum):
    """The head trained on a scored sample to score a whole pool."""

    RIDGE = "ridge"
    LOGISTIC = "logistic"
    MLP = "mlp"
    LORA = "lora"
    NONE = "none"
