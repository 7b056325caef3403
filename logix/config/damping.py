"""Damping of the curvature: a value object of the config, applied when preconditioning.

Finalized statistics never change; damping is resolved against each module's spectrum at scoring
time (:meth:`Damping.resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from logix.config.choices import PreconditionerType


@dataclass(frozen=True)
class Damping:
    """``value`` times the mean curvature eigenvalue (relative) or ``value`` itself (absolute)."""

    value: float = 0.1
    relative: bool = True

    def resolve(self, spectrum: Tensor) -> float:
        if self.value < 0:
            raise ValueError(f"Damping must be non-negative, got {self.value}.")
        return float(self.value * spectrum.mean()) if self.relative else float(self.value)


DEFAULT_DAMPING = Damping()
# Per-preconditioner defaults where they differ from DEFAULT_DAMPING (chosen on both LDS tasks
# of benchmarks/bench_lds.py; docs/benchmarks.md has the numbers).
PRECONDITIONER_DAMPINGS: dict[PreconditionerType, Damping] = {PreconditionerType.RAW_JOINT: Damping(3.0)}


def default_damping(kind: PreconditionerType | str) -> Damping:
    """The damping a preconditioner uses when none is given."""
    return PRECONDITIONER_DAMPINGS.get(PreconditionerType.parse(kind, "preconditioner"), DEFAULT_DAMPING)
