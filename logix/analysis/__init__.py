"""Analysis of logged runs: preconditioners, streaming influence scores, evaluation."""

from __future__ import annotations

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
    register_preconditioner,
)
from logix.errors import StatisticsError
from logix.statistics import Statistics
from logix.store import Store


def load_checkpoint(
    run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.KFAC,
    damping: Damping | float | dict = DEFAULT_DAMPING,
    weight: float = 1.0,
    queries: str = "queries",
) -> Checkpoint:
    """The train store, query rows and preconditioner of a finished run directory."""
    run_dir = Path(run_dir)
    train = Store(run_dir / "stores" / "train")
    query_rows = Store(run_dir / "stores" / queries).read_all()
    stats_path = run_dir / "statistics" / "log.safetensors"
    stats = Statistics.load(stats_path) if stats_path.exists() else None
    if stats is None and PreconditionerType.parse(preconditioner) is not PreconditionerType.IDENTITY:
        raise StatisticsError(f"{run_dir} has no finalized statistics ({stats_path}).")
    pre = Preconditioner(preconditioner, stats, train.layout, damping)
    return Checkpoint(train, query_rows, pre, weight)


def influence(
    run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.KFAC,
    damping: Damping | float | dict = DEFAULT_DAMPING,
    mode: ScoreMode | str = ScoreMode.DOT,
    **kwargs,
) -> InfluenceResult:
    """Influence of every train example of ``run_dir`` on each of its logged queries."""
    cp = load_checkpoint(run_dir, preconditioner, damping)
    query_ids = Store(Path(run_dir) / "stores" / "queries").ids
    return compute_influence(cp, query_ids=query_ids, mode=mode, **kwargs)


__all__ = [
    "Checkpoint",
    "Damping",
    "InfluenceResult",
    "LDSResult",
    "Preconditioner",
    "PreconditionerType",
    "ScoreMode",
    "compute_influence",
    "influence",
    "lds",
    "load_checkpoint",
    "register_preconditioner",
    "retrain_on_subsets",
    "spearman",
    "subset_masks",
    "topk_removal_test",
]
