"""Damping of the curvature: a value object of the config, applied when preconditioning.

Finalized statistics never change; damping is resolved against each module's spectrum at scoring
time (:meth:`Damping.resolve`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import Tensor

from logix.config.choices import PreconditionerType
from logix.errors import ConfigError, StatisticsError


@dataclass(frozen=True)
class Damping:
    """``value`` times the mean curvature eigenvalue (relative) or ``value`` itself (absolute).

    ``value`` must be a finite number >= 0 and ``relative`` a bool; anything else is a
    :class:`~logix.errors.ConfigError` (a ``ValueError``) naming the value."""

    value: float = 0.1
    relative: bool = True

    def __post_init__(self) -> None:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"Damping must be a finite number >= 0, got {value!r}.")
        if not isinstance(self.relative, bool):
            raise ConfigError(f"Damping.relative must be true or false, got {self.relative!r}.")
        object.__setattr__(self, "value", float(value))

    def resolve(self, spectrum: Tensor) -> float:
        d = float(self.value * spectrum.mean()) if self.relative else self.value
        if not math.isfinite(d):
            raise StatisticsError(f"Damping {self.value!r} (relative) resolved to {d!r}: the curvature spectrum is not finite.")
        return d


DEFAULT_DAMPING = Damping()
"""The damping used when none is given: 0.1 times the mean curvature eigenvalue (relative)."""
# Per-preconditioner defaults where they differ from DEFAULT_DAMPING (chosen on both LDS tasks
# of benchmarks/bench_lds.py; docs/benchmarks.md has the numbers).
PRECONDITIONER_DAMPINGS: dict[PreconditionerType, Damping] = {PreconditionerType.RAW_JOINT: Damping(3.0)}


def default_damping(kind: PreconditionerType | str) -> Damping:
    """The damping a preconditioner uses when none is given."""
    return PRECONDITIONER_DAMPINGS.get(PreconditionerType.parse(kind, "preconditioner"), DEFAULT_DAMPING)
