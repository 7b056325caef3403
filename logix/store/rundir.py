"""Every file and folder name of a run directory and of a project directory, in one place.

A *run directory* (``logix.init``; one per logged checkpoint)::

    run.json                 RunInfo: passes done, modules, finalized          (run_file)
    config.yaml              the resolved Config                               (config_file)
    model.json               fingerprint of the model state it was logged with (model_file)
    projection.safetensors   PCA / whitened projections                        (projection_file)
    statistics/<pass>.safetensors   full | kfac | fisher | log                 (statistics_file)
    stores/<name>/           HDF5 shards + manifest: train, queries, ...       (store_dir)
    optimizer.safetensors    Adam moments of a LESS checkpoint                 (MOMENTS_FILE)

A *project directory* (``logix run`` / the Trainer callback) holds ``job.yaml``,
``environment.json``, ``checkpoints.json`` (one entry per logged run directory) and the results:
``influence.jsonl``, ``self_influence.csv``, ``sanity.json``, ``per_module.json``,
``scores.h5`` and the resumable ``scoring/`` parts. Helpers take the directory and return the
path, as kronfluence's ``*_save_path()`` helpers do, so no other module spells a name.
"""

from __future__ import annotations

from pathlib import Path

# ---- a run directory -------------------------------------------------------------------------
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.json"
PROJECTION_FILE = "projection.safetensors"
STATISTICS_DIR = "statistics"
STORES_DIR = "stores"
MOMENTS_FILE = "optimizer.safetensors"
TRAIN_STORE = "train"
QUERY_STORE = "queries"

# ---- a project directory ---------------------------------------------------------------------
JOB_FILE = "job.yaml"
ENVIRONMENT_FILE = "environment.json"
CHECKPOINTS_FILE = "checkpoints.json"
INFLUENCE_FILE = "influence.jsonl"
SELF_INFLUENCE_FILE = "self_influence.csv"
SANITY_FILE = "sanity.json"
PER_MODULE_FILE = "per_module.json"
SCORES_FILE = "scores.h5"
SCORING_DIR = "scoring"
REPORT_FILE = "report.html"

# ---- a contribution directory (``logix contribute``) -------------------------------------------
CONTRIBUTION_SCORES_FILE = "scores.jsonl"
PROBES_FILE = "probes.jsonl"
SELECTION_DIR = "selection"
SELECTED_FILE = "selected.jsonl"
SUMMARY_FILE = "summary.json"
LESS_FILE = "less.json"
ICL_META_FILE = "meta.json"


def run_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_FILE


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def model_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / MODEL_FILE


def projection_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / PROJECTION_FILE


def statistics_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATISTICS_DIR


def statistics_file(run_dir: str | Path, pass_name: str = "log") -> Path:
    """The statistics a pass saved: ``full`` (PCA covariance pass), ``kfac``, ``fisher`` or ``log``."""
    return statistics_dir(run_dir) / f"{getattr(pass_name, 'value', pass_name)}.safetensors"


def stores_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORES_DIR


def store_dir(run_dir: str | Path, name: str = TRAIN_STORE) -> Path:
    """The folder of the store ``name`` (``train``, ``queries``, LESS's Adam stores, ...)."""
    return stores_dir(run_dir) / name


def moments_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / MOMENTS_FILE


def job_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / JOB_FILE


def environment_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / ENVIRONMENT_FILE


def checkpoints_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / CHECKPOINTS_FILE


def influence_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / INFLUENCE_FILE


def self_influence_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / SELF_INFLUENCE_FILE


def sanity_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / SANITY_FILE


def per_module_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / PER_MODULE_FILE


def scores_file(directory: str | Path) -> Path:
    """The full query x train score matrix (HDF5) of a project or a scoring work folder."""
    return Path(directory) / SCORES_FILE


def scoring_dir(project_dir: str | Path) -> Path:
    return Path(project_dir) / SCORING_DIR


def report_file(directory: str | Path) -> Path:
    return Path(directory) / REPORT_FILE


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a logix run (its ``run.json``)."""
    return run_file(path).is_file()
