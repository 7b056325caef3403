"""Preconditioners: the ``(H + damping)^-1`` applied to logged gradients, block-diagonal per module
(or, for ``raw-joint``, over the whole row).

Each module's block of a row is the logged gradient ``V`` (``k_out x k_in``). With the run's
statistics (see :mod:`logix.core.statistics`):

* ``identity``: ``V`` unchanged (gradient dot products; TracIn at one checkpoint).
* ``raw``: ``(C + d I)^-1 vec(V)`` with ``C = E_n[vec G_n vec G_n^T]`` the raw covariance.
* ``kfac``: ``H = (tokens/examples) A kron S``, applied in the eigenbases:
  ``Q_S [(Q_S^T V Q_A) / (c lam_S lam_A^T + d)] Q_A^T``.
* ``ekfac``: the same with the eigenvalue products replaced by the EK-FAC corrections
  ``E_n[(Q_S^T G_n Q_A)^2]``.
* ``raw-joint``: ``(C + d I)^-1 r`` for the whole row ``r`` with ``C = E_n[r_n r_n^T]`` the
  covariance of the concatenated rows (``statistics.raw_joint``): one dense preconditioner across
  modules, so cross-module curvature is kept. One damping for the row (relative: times the mean
  eigenvalue of ``C``).

Damping ``d`` is per module: ``absolute`` uses the value as is; ``relative`` (the default)
multiplies it by the mean of that module's curvature spectrum (the denominators above), so
one setting transfers across modules and models of different scale. Without a damping each
preconditioner takes its default (:func:`default_damping`): relative 0.1, and relative 3 for
``raw-joint`` (the mean eigenvalue of a whole-row covariance sits far above most of its
spectrum, so it needs more; see docs/benchmarks.md). Everything is computed in float64 from
copies: the stored statistics are never modified.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from logix.config.choices import PreconditionerType
from logix.config.damping import Damping, default_damping
from logix.core.statistics import JOINT, Statistics
from logix.errors import ConfigError, StatisticsError
from logix.store.format import Layout


class ModulePreconditioner:
    """Maps blocks ``(n, k_out, k_in)`` to ``(H_m + d)^-1`` applied to each."""

    def __init__(self, fn: Callable[[Tensor], Tensor], damping: float) -> None:
        self._fn = fn
        self.damping = damping

    def __call__(self, blocks: Tensor) -> Tensor:
        return self._fn(blocks.to(torch.float64))


def _checked(stats: Statistics, module: str, key: str, mean: bool = True) -> Tensor:
    value = stats.mean(module, key) if mean else stats.raw_sum(module, key)
    value = value.to(torch.float64)
    if not torch.isfinite(value).all():
        raise StatisticsError(
            f"Module {module!r}: statistic {key!r} contains NaN/Inf; cannot precondition. "
            "Check the training run (divergence, fp16 overflow) and log again."
        )
    return value


def _eigh(matrix: Tensor, module: str, key: str) -> tuple[Tensor, Tensor]:
    matrix = 0.5 * (matrix + matrix.T)
    evals, evecs = torch.linalg.eigh(matrix)
    if not torch.isfinite(evals).all():
        raise StatisticsError(f"Module {module!r}: eigendecomposition of {key} failed (NaN/Inf).")
    return evals.clamp_min(0.0), evecs


def _factor_eigens(stats: Statistics, module: str, key: str) -> tuple[Tensor, Tensor]:
    if stats.has(module, f"{key}_evecs"):
        return (
            _checked(stats, module, f"{key}_evals", mean=False).clamp_min(0.0),
            _checked(stats, module, f"{key}_evecs", mean=False),
        )
    return _eigh(_checked(stats, module, key), module, key)


def _identity(stats: Statistics, module: str, shape: tuple[int, int], damping: Damping) -> ModulePreconditioner:
    return ModulePreconditioner(lambda v: v, 0.0)


def _raw(stats: Statistics, module: str, shape: tuple[int, int], damping: Damping) -> ModulePreconditioner:
    if not stats.has(module, "raw"):
        raise StatisticsError(
            f"Module {module!r} has no raw covariance: log with statistics.raw=true to use 'raw'."
        )
    evals, evecs = _eigh(_checked(stats, module, "raw"), module, "raw")
    d = damping.resolve(evals)
    inv = (evecs / (evals + d)) @ evecs.T

    def apply(v: Tensor) -> Tensor:
        return (v.flatten(1) @ inv).reshape(v.shape)

    return ModulePreconditioner(apply, d)


def _eigenbasis(denominator: Callable, stats: Statistics, module: str, damping: Damping) -> ModulePreconditioner:
    _, q_a = _factor_eigens(stats, module, "A")
    _, q_s = _factor_eigens(stats, module, "S")
    denom = denominator(stats, module)
    d = damping.resolve(denom)
    scale = 1.0 / (denom + d)

    def apply(v: Tensor) -> Tensor:
        return q_s @ ((q_s.T @ v @ q_a) * scale) @ q_a.T

    return ModulePreconditioner(apply, d)


def _kfac_denominator(stats: Statistics, module: str) -> Tensor:
    lam_a, _ = _factor_eigens(stats, module, "A")
    lam_s, _ = _factor_eigens(stats, module, "S")
    ratio = stats.count(module, "tokens") / _examples(stats, module)
    return ratio * lam_s[:, None] * lam_a[None, :]


def _ekfac_denominator(stats: Statistics, module: str) -> Tensor:
    if not stats.has(module, "ekfac"):
        raise StatisticsError(
            f"Module {module!r} has no EK-FAC corrections: log with statistics.ekfac=true to use 'ekfac'."
        )
    return _checked(stats, module, "ekfac").clamp_min(0.0)


def _examples(stats: Statistics, module: str) -> float:
    if not stats.has(module, "examples"):
        raise StatisticsError(f"Module {module!r}: no example count in the statistics.")
    return stats.count(module, "examples")


def _kfac(stats, module, shape, damping):
    if not stats.has(module, "A"):
        raise StatisticsError(f"Module {module!r} has no KFAC factors: log with statistics.kfac=true.")
    return _eigenbasis(_kfac_denominator, stats, module, damping)


def _ekfac(stats, module, shape, damping):
    return _eigenbasis(_ekfac_denominator, stats, module, damping)


_REGISTRY: dict[PreconditionerType, Callable[..., ModulePreconditioner]] = {}


def register_preconditioner(kind: PreconditionerType, builder: Callable[..., ModulePreconditioner]) -> None:
    """Register how the per-module preconditioner of ``kind`` is built.

    ``identity``, ``raw``, ``kfac`` and ``ekfac`` are registered when the module loads;
    ``raw-joint`` (one matrix for the whole row) is built apart, not through this registry.

    Args:
        kind: The preconditioner type the builder implements.
        builder: Called as ``builder(statistics, module, shape, damping)`` with the run's
            :class:`~logix.core.statistics.Statistics`, a module name, its block shape
            ``(k_out, k_in)`` and its :class:`~logix.config.Damping`; returns a
            ``ModulePreconditioner``, which maps blocks ``(n, k_out, k_in)`` to
            ``(H_m + d)^-1`` applied to each.

    Raises:
        ValueError: A builder is registered for ``kind`` already.
    """
    if kind in _REGISTRY:
        raise ValueError(f"A preconditioner {kind.value!r} is already registered.")
    _REGISTRY[kind] = builder


for _kind, _builder in (
    (PreconditionerType.IDENTITY, _identity),
    (PreconditionerType.RAW, _raw),
    (PreconditionerType.KFAC, _kfac),
    (PreconditionerType.EKFAC, _ekfac),
):
    register_preconditioner(_kind, _builder)


def resolve_kind(kind: PreconditionerType | str, statistics: Statistics | None) -> PreconditionerType:
    """``kind``, or for ``auto`` the best curvature ``statistics`` hold: ``ekfac`` (corrections
    logged), else ``kfac`` (factors logged), else ``identity``."""
    kind = PreconditionerType.parse(kind, "preconditioner")
    if kind is not PreconditionerType.AUTO:
        return kind
    modules = [] if statistics is None else [m for m in statistics.modules if m != JOINT]
    if modules and all(statistics.has(m, "ekfac") for m in modules):
        return PreconditionerType.EKFAC
    if modules and all(statistics.has(m, "A") and statistics.has(m, "S") for m in modules):
        return PreconditionerType.KFAC
    return PreconditionerType.IDENTITY


def _raw_joint(stats: Statistics, layout: Layout, damping: Damping) -> ModulePreconditioner:
    """``(C + d I)^-1`` over the whole row, ``C`` the covariance of the concatenated rows."""
    if not stats.has(JOINT, "raw"):
        raise StatisticsError(
            "This run has no whole-row covariance: log with statistics.raw_joint=true to use 'raw-joint'."
        )
    cov = _checked(stats, JOINT, "raw")
    if cov.shape != (layout.dim, layout.dim):
        raise StatisticsError(
            f"The whole-row covariance is {tuple(cov.shape)} but the store's rows have {layout.dim} "
            "entries: the statistics belong to another run."
        )
    evals, evecs = _eigh(cov, "<whole row>", "raw")
    d = damping.resolve(evals)
    inv = (evecs / (evals + d)) @ evecs.T
    return ModulePreconditioner(lambda rows: rows @ inv, d)


class Preconditioner:
    """Block-diagonal preconditioner over full rows (every module's block); ``raw-joint`` is one
    dense block over the whole row.

    Calling it maps ``(n, dim)`` rows to the preconditioned rows ``(H + d)^-1 g`` (float64).

    Args:
        kind: ``identity``, ``raw``, ``raw-joint``, ``kfac``, ``ekfac`` or a registered kind
            (:func:`register_preconditioner`).
        statistics: The run's finalized statistics (None only for ``identity``).
        layout: The row layout of the rows it will be applied to.
        damping: A :class:`~logix.config.Damping`, a number (relative damping), or a dict of them
            by module name (``"*"``: every other module); None: the preconditioner's default
            (:func:`~logix.config.default_damping`); ``raw-joint`` takes one damping.

    Raises:
        StatisticsError: The statistics are missing or lack what ``kind`` needs (e.g. EK-FAC
            corrections), or ``raw-joint`` was given per-module dampings.
        ConfigError: A damping is not a finite number >= 0, or names a module the layout lacks.
    """

    def __init__(
        self,
        kind: PreconditionerType | str,
        statistics: Statistics | None,
        layout: Layout,
        damping: Damping | float | dict[str, Damping | float] | None = None,
        projected: bool = True,
    ) -> None:
        self.kind = resolve_kind(kind, statistics)
        if damping is None:
            damping = default_damping(self.kind, projected)
        damping = _checked_damping(damping, layout)
        if self.kind is not PreconditionerType.IDENTITY and statistics is None:
            raise StatisticsError(f"Preconditioner {self.kind.value!r} needs the run's statistics.")
        self.layout = layout
        self.modules = {}
        self._joint: ModulePreconditioner | None = None
        if self.kind is PreconditionerType.RAW_JOINT:
            if isinstance(damping, dict) and set(damping) - {"*"}:
                raise StatisticsError(
                    "'raw-joint' has one damping for the whole row; per-module dampings "
                    f"({sorted(damping)}) do not apply. Pass one Damping (or {{'*': Damping}})."
                )
            self._joint = _raw_joint(statistics, layout, _damping_for(damping, "*"))
            return
        for block in layout.blocks:
            damp = _damping_for(damping, block.name)
            self.modules[block.name] = _REGISTRY[self.kind](statistics, block.name, block.shape, damp)

    @property
    def damping(self) -> dict[str, float]:
        """The resolved absolute damping of each module (``raw-joint``: the row's, for every module)."""
        if self._joint is not None:
            return {name: self._joint.damping for name in self.layout.names}
        return {name: m.damping for name, m in self.modules.items()}

    def __call__(self, rows: Tensor) -> Tensor:
        """``(n, dim)`` rows -> preconditioned rows, float64."""
        rows = rows.to(torch.float64)
        if self.kind is PreconditionerType.IDENTITY:
            return rows
        if self._joint is not None:
            return self._joint(rows)
        out = torch.empty_like(rows)
        for block in self.layout.blocks:
            v = rows[:, block.columns].reshape(rows.shape[0], *block.shape)
            out[:, block.columns] = self.modules[block.name](v).reshape(rows.shape[0], -1)
        return out


def _one_damping(value, where: str) -> Damping:
    if isinstance(value, Damping):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where} must be a Damping or a finite number >= 0, got {value!r}.")
    try:
        return Damping(value)
    except ConfigError:
        raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}.") from None


def _checked_damping(damping, layout: Layout) -> Damping | dict[str, Damping]:
    """A Damping, or a ``{module or '*': Damping}`` dict, each value checked (finite, >= 0) and every
    key a module of ``layout`` (a misspelt name would silently fall back to the default)."""
    if not isinstance(damping, Mapping):
        return _one_damping(damping, "damping")
    unknown = sorted(str(k) for k in damping if k != "*" and k not in layout.names)
    if unknown:
        raise ConfigError(f"damping names modules that the store does not log: {unknown}; its modules are "
                          f"{layout.names} (use '*' for every other module).")
    return {k: _one_damping(v, f"damping[{k!r}]") for k, v in damping.items()}


def _damping_for(damping, module: str) -> Damping:
    if isinstance(damping, dict):
        return damping.get(module, damping.get("*", Damping()))
    return damping


def project_rows(full_rows: Tensor, full_layout: Layout, projections: dict, layout: Layout) -> Tensor:
    """Full-space rows ``(n, full_layout.dim)`` -> logged-space rows ``(n, layout.dim)``: each
    module's block ``V`` (``d_out x d_in``) becomes ``P_out^T V P_in`` (float64).

    Args:
        full_rows: ``(n, full_layout.dim)`` rows of a ``projection: none`` run.
        full_layout: Their layout.
        projections: Module name to :class:`~logix.core.projection.ModuleProjection` (``None``
            matrices are identities, as for ``projection: none``), e.g. :func:`run_projections`'.
        layout: The logged layout to project to.

    Returns:
        ``(n, layout.dim)`` float64 rows.

    Raises:
        StatisticsError: A module's full-space block does not project to its logged block (the
            two runs watch different models or modules).
    """
    full_rows = full_rows.to(torch.float64)
    if full_rows.dim() != 2 or full_rows.shape[1] != full_layout.dim:
        raise StatisticsError(
            f"Full-space rows have shape {tuple(full_rows.shape)} but the full-space run's rows have "
            f"{full_layout.dim} entries: the rows belong to another run."
        )
    if full_layout.names != layout.names:
        raise StatisticsError(
            f"The full-space run logs the modules {full_layout.names} but the projected run logs "
            f"{layout.names}: log both runs from the same model with the same capture settings."
        )
    n = full_rows.shape[0]
    out = torch.empty(n, layout.dim, dtype=torch.float64)
    for fb, block in zip(full_layout.blocks, layout.blocks):
        proj = projections.get(block.name)
        p_out = None if proj is None or proj.p_out is None else proj.p_out.to(torch.float64)
        p_in = None if proj is None or proj.p_in is None else proj.p_in.to(torch.float64)
        expected = (fb.shape[0] if p_out is None else p_out.shape[1], fb.shape[1] if p_in is None else p_in.shape[1])
        rows_ok = (p_out is None or p_out.shape[0] == fb.shape[0]) and (p_in is None or p_in.shape[0] == fb.shape[1])
        if not rows_ok or expected != block.shape:
            raise StatisticsError(
                f"Module {block.name!r}: a full-space block of shape {fb.shape} does not project to the "
                f"logged block {block.shape} with this run's projection: the two runs watch different "
                "models or modules."
            )
        v = full_rows[:, fb.columns].reshape(n, *fb.shape)
        if p_out is not None:
            v = p_out.T @ v
        if p_in is not None:
            v = v @ p_in
        out[:, block.columns] = v.reshape(n, -1)
    return out


class AsymmetricPreconditioner:
    """Asymmetric preconditioning: queries are preconditioned in *full* space, then projected
    with the train rows' projection, so ``<P^T H^-1 g_q, P^T g_t>`` approximates the
    full-dimension ``<H^-1 g_q, g_t>`` (for a factored projection the block of a module is
    ``P_out^T (H^-1 G_q) P_in``). Train rows are used as logged (projected, not preconditioned).

    Args:
        kind (PreconditionerType | str): the full-space preconditioner (``ekfac`` by default; any per-module kind whose
            statistics the full-space run has).
        full_statistics: statistics of a ``projection: none`` run of the same model.
        full_layout: that run's row layout.
        projections: the projected run's per-module projections.
        layout: the projected run's row layout.
        damping: as for :class:`Preconditioner`, resolved on the full-space spectra.
    """

    def __init__(self, kind, full_statistics: Statistics, full_layout: Layout, projections: dict,
                 layout: Layout, damping: Damping | float | dict[str, Damping | float] | None = None) -> None:
        self.full = Preconditioner(kind, full_statistics, full_layout, damping, projected=False)  # full-space rows
        if self.full.kind is PreconditionerType.RAW_JOINT:
            raise StatisticsError(
                "Asymmetric preconditioning needs a per-module preconditioner (ekfac, kfac, raw, identity); "
                "'raw-joint' over full-space rows is not supported."
            )
        self.kind = self.full.kind
        self.full_layout, self.projections, self.layout = full_layout, projections, layout

    @property
    def damping(self) -> dict[str, float]:
        return self.full.damping

    def queries(self, full_rows: Tensor) -> Tensor:
        """Full-space query rows -> projected, full-space-preconditioned rows ``(n, layout.dim)``."""
        return project_rows(self.full(full_rows), self.full_layout, self.projections, self.layout)
