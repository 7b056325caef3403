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

    Finalized statistics never change: the damping is resolved against each module's curvature
    spectrum when scoring (:meth:`resolve`).

    Args:
        value: The damping, a finite number >= 0 (relative: a multiple of the mean eigenvalue).
        relative: Whether ``value`` is relative to the mean curvature eigenvalue, or absolute.

    Raises:
        ConfigError: ``value`` is not a finite number >= 0, or ``relative`` not a bool (a
            ``ValueError``, naming the value).
    """

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
        """The absolute damping for one module.

        Args:
            spectrum: The module's curvature eigenvalues (or what the preconditioner divides by).

        Returns:
            ``value`` times the spectrum's mean (relative), or ``value`` (absolute).

        Raises:
            StatisticsError: The result is not finite (the spectrum is not), or a relative
                damping of an all-zero spectrum (zero: the preconditioner would divide by zero).
        """
        if not self.relative:
            return self.value
        mean = float(spectrum.mean())
        if not math.isfinite(mean):
            raise StatisticsError(f"Damping {self.value!r} (relative) resolved to {mean!r}: the curvature spectrum is not finite.")
        if mean <= 0:
            raise StatisticsError(
                "A relative damping of an all-zero curvature spectrum is zero and the preconditioner would divide by "
                "zero: the module's logged gradients were all zero (a frozen or unused module). Leave it out "
                "(capture.modules / capture.exclude), or give an absolute damping (relative=False)."
            )
        return self.value * mean


DEFAULT_DAMPING = Damping()
"""The damping used when none is given: 0.1 times the mean curvature eigenvalue (relative)."""
# Per-preconditioner defaults where they differ from DEFAULT_DAMPING: raw-joint chosen on both LDS
# tasks of benchmarks/bench_lds.py (docs/benchmarks.md), raw on the tuning tasks of
# benchmarks/suite_raw.py (the best worst case over mlp and cnn; flat from 1 to 3; docs/influence.md).
PRECONDITIONER_DAMPINGS: dict[PreconditionerType, Damping] = {PreconditionerType.RAW_JOINT: Damping(3.0),
                                                              PreconditionerType.RAW: Damping(2.0)}


PROJECTED_EKFAC_DAMPING = Damping(0.01)
"""EK-FAC on projected rows: relative 0.01 (benchmarks/bench_suite.py, orthogonal rows, five projection
draws: the best worst case over the tuning tasks; full-dimension rows keep 0.1, which is better there)."""


def describe_damping(damping: Damping | None) -> str:
    """``"0.01 relative"``, ``"1e-05"`` (absolute), or for None ``"default"`` (the preconditioner's)."""
    if damping is None:
        return "default"
    return f"{damping.value:g}{' relative' if damping.relative else ''}"


def default_damping(kind: PreconditionerType | str, projected: bool = True) -> Damping:
    """The damping a preconditioner uses when none is given.

    Args:
        kind: The preconditioner.

    Returns:
        ``Damping(3.0)`` for ``raw-joint``, ``Damping(2.0)`` for ``raw``, ``Damping(0.01)`` for
        ``ekfac`` on projected rows, :data:`DEFAULT_DAMPING` for every other (chosen on the LDS
        benchmarks, docs/benchmarks.md and docs/influence.md).
    """
    kind = PreconditionerType.parse(kind, "preconditioner")
    if kind is PreconditionerType.EKFAC and projected:
        return PROJECTED_EKFAC_DAMPING
    return PRECONDITIONER_DAMPINGS.get(kind, DEFAULT_DAMPING)
