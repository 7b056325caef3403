"""Analysis of logged runs: preconditioners, streaming influence scores, evaluation."""

from logix.analysis.api import index_influence, index_run_dir, influence
from logix.analysis.checkpoints import (
    checkpoint_weights,
    load_asymmetric_checkpoint,
    load_checkpoint,
    load_checkpoints,
    run_projections,
)
from logix.analysis.evaluate import (
    LDSResult,
    lds,
    retrain_on_subsets,
    spearman,
    subset_masks,
    topk_removal_test,
)
from logix.analysis.index import Index, IndexHits
from logix.analysis.influence import Checkpoint, InfluenceResult, compute_influence
from logix.analysis.precondition import (
    AsymmetricPreconditioner,
    Preconditioner,
    project_rows,
    register_preconditioner,
)
from logix.analysis.tuning import SWEEP_DAMPINGS, DampingSweep, damping_sweep
from logix.config.choices import PreconditionerType, ScoreMode
from logix.config.damping import DEFAULT_DAMPING, Damping, default_damping
from logix.store.rundir import CHECKPOINTS_FILE

__all__ = [
    "CHECKPOINTS_FILE",
    "DEFAULT_DAMPING",
    "SWEEP_DAMPINGS",
    "AsymmetricPreconditioner",
    "Checkpoint",
    "Damping",
    "DampingSweep",
    "Index",
    "IndexHits",
    "InfluenceResult",
    "LDSResult",
    "Preconditioner",
    "PreconditionerType",
    "ScoreMode",
    "compute_influence",
    "damping_sweep",
    "checkpoint_weights",
    "default_damping",
    "index_influence",
    "index_run_dir",
    "influence",
    "load_checkpoints",
    "lds",
    "load_checkpoint",
    "load_asymmetric_checkpoint",
    "project_rows",
    "run_projections",
    "register_preconditioner",
    "retrain_on_subsets",
    "spearman",
    "subset_masks",
    "topk_removal_test",
]
