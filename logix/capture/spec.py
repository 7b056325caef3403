"""The vocabulary of a run's passes: their names, their spaces, and what the hooks compute in each."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PassName(str, enum.Enum):
    """The passes over the data a run can make (``run.json`` records them as these strings)."""

    COVARIANCE = "covariance"  # full-space A and S, from which PCA / whitened projections are built
    KFAC = "kfac"  # log-space A and S (and their eigenbases) before the log pass
    FISHER = "fisher"  # EK-FAC corrections / raw covariance with sampled labels (true Fisher)
    LOG = "log"  # the rows of the train store (and the statistics of the data's labels)
    QUERIES = "queries"  # the rows of the queries store, after the run is finalized
    ADAM = "adam"  # full-space gradients that LESS turns into Adam rows

    def __str__(self) -> str:
        return self.value


class Space(str, enum.Enum):
    """Where the hooks of a pass work: the full gradient space or the run's projected one."""

    FULL = "full"  # no projection
    LOG = "log"  # the run's projection

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PassSpec:
    """What the hooks compute during one pass over the data.

    Attributes:
        name: The pass.
        space: Whether the hooks project (``log``) or see full-space gradients (``full``, the
            covariance pass of PCA / whitened projection).
        covariance: Accumulate the activation and output-gradient covariances ``A`` and ``S``.
        gradients: Form per-example gradients (rows, EK-FAC corrections, raw covariance).
        per_token: One row per unmasked token instead of per example.
        rows: With ``gradients``: write them as rows of the train store.
        gradient_stats: With ``gradients``: accumulate EK-FAC corrections / raw covariance.
        sample_labels: The loop should use labels sampled from the model (true Fisher).
        ekfac_from_rows: EK-FAC corrections come from the stored rows once the pass ends (in the
            eigenbasis of the ``A`` and ``S`` this pass accumulated), not from a pass before it.
    """

    name: PassName
    space: Space
    covariance: bool  # accumulate A and S
    gradients: bool  # form per-example gradients (rows, EK-FAC corrections, raw covariance)
    per_token: bool = False
    rows: bool = True  # with gradients: write them as rows of the train store
    gradient_stats: bool = True  # with gradients: accumulate EK-FAC corrections / raw covariance
    sample_labels: bool = False  # the loop should use labels sampled from the model (true Fisher)
    ekfac_from_rows: bool = False  # EK-FAC corrections from the stored rows after the pass

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", PassName(self.name))
        object.__setattr__(self, "space", Space(self.space))
