"""Analysis of logged runs: preconditioners, streaming influence scores, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from logix.analysis.evaluate import (
    LDSResult,
    lds,
    retrain_on_subsets,
    spearman,
    subset_masks,
    topk_removal_test,
)
from logix.analysis.influence import Checkpoint, InfluenceResult, ScoreMode, compute_influence
from logix.analysis.precondition import (
    DEFAULT_DAMPING,
    Damping,
    Preconditioner,
    PreconditionerType,
    default_damping,
    register_preconditioner,
)
from logix.errors import StatisticsError
from logix.statistics import Statistics
from logix.store import Store


def load_checkpoint(
    run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.KFAC,
    damping: Damping | float | dict | None = None,
    weight: float = 1.0,
    queries: str = "queries",
) -> Checkpoint:
    """The train store, query rows and preconditioner of a finished run directory.

    ``damping=None`` uses the preconditioner's default (``precondition.default_damping``)."""
    run_dir = Path(run_dir)
    train = Store(run_dir / "stores" / "train")
    query_rows = Store(run_dir / "stores" / queries).read_all()
    stats_path = run_dir / "statistics" / "log.safetensors"
    stats = Statistics.load(stats_path) if stats_path.exists() else None
    if stats is None and PreconditionerType.parse(preconditioner) is not PreconditionerType.IDENTITY:
        raise StatisticsError(f"{run_dir} has no finalized statistics ({stats_path}).")
    pre = Preconditioner(preconditioner, stats, train.layout, damping)
    return Checkpoint(train, query_rows, pre, weight)


CHECKPOINTS_FILE = "checkpoints.json"


def checkpoint_weights(entries: list[dict], weighting: str) -> list[float]:
    """Weights of logged checkpoints: ``lr`` (learning rates, normalised to sum 1),
    ``uniform`` or ``last`` (only the last checkpoint)."""
    n = len(entries)
    if n == 1:
        return [1.0]
    if weighting == "last":
        return [0.0] * (n - 1) + [1.0]
    if weighting == "uniform":
        return [1.0 / n] * n
    if weighting != "lr":
        raise ValueError(f"Unknown checkpoint weighting: {weighting!r}. Choose between ['lr', 'uniform', 'last'].")
    lrs = [e.get("learning_rate") for e in entries]
    if any(lr is None for lr in lrs) or sum(lrs) <= 0:
        raise StatisticsError(
            "Some checkpoints have no recorded learning rate (or all are 0): use weighting 'uniform'."
        )
    total = float(sum(lrs))
    return [float(lr) / total for lr in lrs]


def load_checkpoints(
    project_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.KFAC,
    damping: Damping | float | dict | None = None,
    weighting: str = "lr",
) -> tuple[list[Checkpoint], list[dict]]:
    """Every checkpoint a Trainer callback logged under ``project_dir`` (``checkpoints.json``),
    weighted TracIn-style, and the entries of that file; or the single run ``project_dir``."""
    project_dir = Path(project_dir)
    index = project_dir / CHECKPOINTS_FILE
    if not index.exists():
        return [load_checkpoint(project_dir, preconditioner, damping)], [{"name": project_dir.name, "dir": "."}]
    entries = json.loads(index.read_text())["checkpoints"]
    if not entries:
        raise StatisticsError(f"{index} lists no logged checkpoint.")
    weights = checkpoint_weights(entries, str(weighting))
    cps = [load_checkpoint(project_dir / e["dir"], preconditioner, damping, w)
           for e, w in zip(entries, weights) if w > 0]
    return cps, [e for e, w in zip(entries, weights) if w > 0]


def influence(
    run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.KFAC,
    damping: Damping | float | dict | None = None,
    mode: ScoreMode | str = ScoreMode.DOT,
    weighting: str = "lr",
    **kwargs,
) -> InfluenceResult:
    """Influence of every train example of ``run_dir`` on each of its logged queries.

    ``run_dir`` is one run, or a Trainer callback's project directory whose checkpoints are
    combined TracIn-style (``weighting``: ``lr`` | ``uniform`` | ``last``).
    """
    cps, entries = load_checkpoints(run_dir, preconditioner, damping, weighting)
    query_ids = Store(Path(run_dir) / entries[-1]["dir"] / "stores" / "queries").ids
    return compute_influence(cps, query_ids=query_ids, mode=mode, **kwargs)


__all__ = [
    "CHECKPOINTS_FILE",
    "DEFAULT_DAMPING",
    "Checkpoint",
    "Damping",
    "InfluenceResult",
    "LDSResult",
    "Preconditioner",
    "PreconditionerType",
    "ScoreMode",
    "compute_influence",
    "checkpoint_weights",
    "default_damping",
    "influence",
    "load_checkpoints",
    "lds",
    "load_checkpoint",
    "register_preconditioner",
    "retrain_on_subsets",
    "spearman",
    "subset_masks",
    "topk_removal_test",
]
