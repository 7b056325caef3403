"""Loading logged runs for scoring: checkpoints (train store, queries, preconditioner, weight).

A run directory gives one :class:`~logix.analysis.influence.Checkpoint`; a Trainer callback's
project directory lists several in ``checkpoints.json``, combined TracIn-style.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from logix.analysis.influence import Checkpoint
from logix.analysis.precondition import AsymmetricPreconditioner, Preconditioner
from logix.config import ProjectionType, resolve_config
from logix.config.choices import CheckpointWeighting, PreconditionerType
from logix.config.damping import Damping
from logix.core.projection import ModuleProjection, load_projections, seeded_projection
from logix.core.statistics import Statistics
from logix.errors import LogixError, StatisticsError
from logix.store.format import read_manifest
from logix.store.reader import Store
from logix.store.rundir import (
    CONFIG_FILE,
    PROJECTION_FILE,
    QUERY_STORE,
    TRAIN_STORE,
    checkpoints_file,
    config_file,
    projection_file,
    statistics_file,
    store_dir,
)


def load_checkpoint(
    run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.AUTO,
    damping: Damping | float | dict | None = None,
    weight: float = 1.0,
    queries: str | Tensor = QUERY_STORE,
) -> Checkpoint:
    """The train store, query rows and preconditioner of a finished run directory.

    Args:
        run_dir: The run directory (``logix.init``'s, or one checkpoint of a project).
        preconditioner: ``auto`` (the best curvature the run logged: ``ekfac``, else ``kfac``, else
            ``identity``), ``identity``, ``raw``, ``raw-joint``, ``kfac`` or ``ekfac``.
        damping: A :class:`~logix.config.Damping`, a number (relative damping), or a dict of them
            by module name (``"*"``: every other module); None: the preconditioner's default
            (:func:`~logix.config.default_damping`).
        weight: The checkpoint's weight when several are combined.
        queries: The name of the run's store of logged query rows, or the rows themselves
            (``(n, dim)``, projected like the train rows, e.g. ``run.capture``'s).

    Returns:
        What :func:`~logix.analysis.compute_influence` scores.

    Raises:
        StatisticsError: The run has no finalized statistics (any preconditioner but
            ``identity`` needs them), or no committed query rows.
        LogixError: Query rows given as a tensor do not have the train rows' width.
    """
    run_dir = Path(run_dir)
    train = Store(store_dir(run_dir, TRAIN_STORE))
    if isinstance(queries, Tensor):
        if queries.dim() != 2 or queries.shape[1] != train.dim:
            raise LogixError(f"Query rows of shape {tuple(queries.shape)} for {run_dir}, whose rows have "
                             f"{train.dim} entries: capture them with this run's projection.")
        query_rows = queries.to(torch.float32)
    else:
        query_rows = logged_queries(run_dir, queries).read_all()
    stats_path = statistics_file(run_dir)
    stats = Statistics.load(stats_path) if stats_path.exists() else None
    kind = PreconditionerType.parse(preconditioner, "preconditioner")
    if stats is None and kind not in (PreconditionerType.IDENTITY, PreconditionerType.AUTO):
        raise StatisticsError(f"{run_dir} has no finalized statistics ({stats_path}).")
    pre = Preconditioner(kind, stats, train.layout, damping, projected=rows_projected(run_dir))
    return Checkpoint(train, query_rows, pre, weight)


def rows_projected(run_dir: str | Path) -> bool:
    """Whether the run's rows are projected (its ``config.yaml``; True when it has none): full
    rows (``projection: none``) take another default EK-FAC damping."""
    path = config_file(run_dir)
    if not path.exists():
        return True
    return resolve_config(path).projection.type is not ProjectionType.NONE


def logged_queries(run_dir: str | Path, name: str = QUERY_STORE) -> Store:
    """The committed query rows of a run, or an error that says how to commit them."""
    path = store_dir(run_dir, name)
    hint = ("call run.finalize() after the `with run.log_queries(...)` blocks: it commits the query rows "
            "(a first finalize() ends the training rows, a second one the queries)")
    if read_manifest(path) is None:
        raise StatisticsError(f"{run_dir} has no logged queries ({path}): {hint}.")
    store = Store(path)
    if store.n_rows == 0:
        raise StatisticsError(f"{run_dir} has no committed query rows: {hint}.")
    return store


def run_projections(run_dir: str | Path, full_layout, layout) -> dict:
    """The per-module projections of a run, rebuilt from its config (random) or read from its
    directory (PCA / whitened).

    Args:
        run_dir: The run directory.
        full_layout (Layout): Each module's unprojected block shape (a ``projection: none`` run's layout).
        layout (Layout): The run's logged layout.

    Returns:
        Module name to ``ModuleProjection`` (``None`` matrices, i.e. identities, for
        ``projection: none``).

    Raises:
        StatisticsError: The directory has no config, or its PCA / whitening pass did not finish.
    """
    run_dir = Path(run_dir)
    config_path = config_file(run_dir)
    if not config_path.exists():
        raise StatisticsError(f"{run_dir} has no {CONFIG_FILE}: not a logix run directory.")
    cfg = resolve_config(config_path).projection
    if cfg.type is ProjectionType.NONE:
        return {name: ModuleProjection(None, None) for name in layout.names}
    if cfg.type.needs_covariance:
        path = projection_file(run_dir)
        if not path.exists():
            raise StatisticsError(f"{run_dir} has no {PROJECTION_FILE}: its PCA pass did not finish.")
        return load_projections(path, layout.names)
    out = {}
    for fb, block in zip(full_layout.blocks, layout.blocks):
        out[block.name] = ModuleProjection(
            seeded_projection(cfg.type, block.name, fb.shape[1], block.shape[1], cfg.seed, "in"),
            seeded_projection(cfg.type, block.name, fb.shape[0], block.shape[0], cfg.seed, "out"),
        )
    return out


def load_asymmetric_checkpoint(
    run_dir: str | Path,
    full_run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.EKFAC,
    damping: Damping | float | dict | None = None,
    weight: float = 1.0,
    queries: str = QUERY_STORE,
) -> Checkpoint:
    """Asymmetric preconditioning: the projected train store of ``run_dir`` scored against
    queries preconditioned in full space.

    Each query is preconditioned in ``full_run_dir``'s space, ``H^-1 g_q``, then projected with
    ``run_dir``'s projection; the returned checkpoint's preconditioner is the identity (train
    rows are used as logged), so ``compute_influence`` scores ``<P^T H^-1 g_q, P^T g_t>``.
    Scores are meant for mode ``dot``.

    Args:
        run_dir: The projected run whose train rows are scored.
        full_run_dir: A ``projection: none`` run of the same model (same modules) whose
            statistics hold the full-space curvature (``statistics.ekfac`` for ``ekfac``) and
            whose ``queries`` store holds the full-space query gradients (``run.log_queries``).
        preconditioner: The full-space preconditioner (a per-module one: not ``raw-joint``).
        damping: A :class:`~logix.config.Damping`, a number (relative damping), or a dict of them
            by module name (``"*"``: every other module); None: the preconditioner's default
            (:func:`~logix.config.default_damping`).
        weight: The checkpoint's weight when several are combined.
        queries: The name of ``full_run_dir``'s store of query rows.

    Returns:
        The checkpoint: ``run_dir``'s train store, the preconditioned, projected queries.

    Raises:
        StatisticsError: ``full_run_dir`` has no finalized statistics or no committed queries, or
            the two runs' modules do not match.
    """
    run_dir, full_run_dir = Path(run_dir), Path(full_run_dir)
    train = Store(store_dir(run_dir, TRAIN_STORE))
    full_queries = logged_queries(full_run_dir, queries)
    full_layout = full_queries.layout
    stats_path = statistics_file(full_run_dir)
    if not stats_path.exists():
        raise StatisticsError(f"{full_run_dir} has no finalized statistics ({stats_path}).")
    projections = run_projections(run_dir, full_layout, train.layout)
    pre = AsymmetricPreconditioner(preconditioner, Statistics.load(stats_path), full_layout, projections,
                                   train.layout, damping)
    rows = pre.queries(full_queries.read_all())
    return Checkpoint(train, rows, Preconditioner(PreconditionerType.IDENTITY, None, train.layout), weight)


def checkpoint_weights(entries: list[dict], weighting: CheckpointWeighting | str) -> list[float]:
    """Weights of logged checkpoints (TracIn-style).

    Args:
        entries: The checkpoints' entries of ``checkpoints.json`` (``learning_rate`` each, for ``lr``).
        weighting: ``lr`` (learning rates, normalised to sum 1), ``uniform`` or ``last`` (only
            the last checkpoint).

    Returns:
        One weight per entry; ``[1.0]`` for a single checkpoint whatever ``weighting``.

    Raises:
        ValueError: ``weighting`` is none of the three.
        StatisticsError: ``lr`` weighting, but a checkpoint has no recorded learning rate (or all are 0).
    """
    n = len(entries)
    if n == 1:
        return [1.0]
    if weighting not in list(CheckpointWeighting):
        raise ValueError(f"Unknown checkpoint weighting: {weighting!r}. Choose between ['lr', 'uniform', 'last'].")
    weighting = CheckpointWeighting(weighting)
    if weighting is CheckpointWeighting.LAST:
        return [0.0] * (n - 1) + [1.0]
    if weighting is CheckpointWeighting.UNIFORM:
        return [1.0 / n] * n
    lrs = [e.get("learning_rate") for e in entries]
    if any(lr is None for lr in lrs) or sum(lrs) <= 0:
        raise StatisticsError(
            "Some checkpoints have no recorded learning rate (or all are 0): use weighting 'uniform'."
        )
    total = float(sum(lrs))
    return [float(lr) / total for lr in lrs]


def load_checkpoints(
    project_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.AUTO,
    damping: Damping | float | dict | None = None,
    weighting: CheckpointWeighting | str = CheckpointWeighting.LR,
) -> tuple[list[Checkpoint], list[dict]]:
    """Every checkpoint a Trainer callback logged under ``project_dir`` (``checkpoints.json``),
    weighted TracIn-style; or the single run ``project_dir``.

    Args:
        project_dir: A project directory with ``checkpoints.json``, or one run directory.
        preconditioner: As for :func:`load_checkpoint`.
        damping: A :class:`~logix.config.Damping`, a number (relative damping), or a dict of them
            by module name (``"*"``: every other module); None: the preconditioner's default
            (:func:`~logix.config.default_damping`).
        weighting: How the checkpoints' scores combine (:func:`checkpoint_weights`).

    Returns:
        The checkpoints of nonzero weight, and their entries of ``checkpoints.json`` (for a single
        run, one entry ``{"name": ..., "dir": "."}``).

    Raises:
        StatisticsError: ``checkpoints.json`` lists no checkpoint, or a checkpoint cannot be loaded.
    """
    project_dir = Path(project_dir)
    index = checkpoints_file(project_dir)
    if not index.exists():
        return [load_checkpoint(project_dir, preconditioner, damping)], [{"name": project_dir.name, "dir": "."}]
    entries = json.loads(index.read_text())["checkpoints"]
    if not entries:
        raise StatisticsError(f"{index} lists no logged checkpoint.")
    weights = checkpoint_weights(entries, str(weighting))
    cps = [load_checkpoint(project_dir / e["dir"], preconditioner, damping, w)
           for e, w in zip(entries, weights) if w > 0]
    return cps, [e for e, w in zip(entries, weights) if w > 0]
