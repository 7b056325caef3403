"""Every file and folder name of a run directory and of a project directory, in one place.

A *run directory* (``logix.init``; one per logged checkpoint)::

    run.json                 RunInfo: passes done, modules, finalized          (run_file)
    config.yaml              the resolved Config                               (config_file)
    model.json               fingerprint of the model state it was logged with (model_file)
    projection.safetensors   PCA / whitened projections                        (projection_file)
    statistics/<pass>.safetensors   full | kfac | fisher | log                 (statistics_file)
    stores/<name>/           HDF5 shards + manifest: train, queries, ...       (store_dir)
    optimizer.safetensors    Adam moments of a LESS checkpoint                 (MOMENTS_FILE)
    index/                   logix index: index.faiss, index.json, norms       (index_dir)

A *project directory* (``logix run`` / the Trainer callback) holds ``job.yaml``,
``environment.json``, ``checkpoints.json`` (one entry per logged run directory), ``final_model.safetensors``
(``logix run``: the fine-tuned weights, for ``logix query --text``) and the results:
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
INDEX_DIR = "index"  # logix index: the faiss index of the train rows (index.faiss, index.json, norms)
INDEX_FILE = "index.faiss"
INDEX_META_FILE = "index.json"
INDEX_NORMS_FILE = "norms.safetensors"
TRAIN_STORE = "train"
QUERY_STORE = "queries"
ADAM_STORE = "train_adam"  # LESS: Adam-preconditioned train rows (paper variant)
ADAM_CODE_STORE = "train_adam_code"  # ... of the code variant

# ---- a project directory ---------------------------------------------------------------------
JOB_FILE = "job.yaml"
ENVIRONMENT_FILE = "environment.json"
CHECKPOINTS_FILE = "checkpoints.json"
"""The file of a project directory that lists its checkpoint runs (with their learning rates)."""
INFLUENCE_FILE = "influence.jsonl"
SELF_INFLUENCE_FILE = "self_influence.csv"
SANITY_FILE = "sanity.json"
PER_MODULE_FILE = "per_module.json"
SCORES_FILE = "scores.h5"
SCORING_DIR = "scoring"
REPORT_FILE = "report.html"
FINAL_MODEL_FILE = "final_model.safetensors"  # logix run: the fine-tuned model's weights
TRAINER_DIR = "trainer"  # the Hugging Face Trainer's output_dir of a fine-tuning job
MODEL_RUN = "model"  # the run directory of a job that logs its model without training (logix extract)
# a scoring work folder (``sharded_influence``; by default a project's ``scoring/``)
SCORING_JOB_FILE = "job.json"
PART_FILE = "part-{index:06d}.safetensors"
SCORES_PART_FILE = "scores-{index:06d}.h5"

# ---- a contribution directory (``logix contribute``) -------------------------------------------
CONTRIBUTION_SCORES_FILE = "scores.jsonl"
PROBES_FILE = "probes.jsonl"
SELECTION_DIR = "selection"
SELECTED_FILE = "selected.jsonl"
SUMMARY_FILE = "summary.json"
LESS_FILE = "less.json"
ICL_META_FILE = "meta.json"
ICL_DIR = "icl"  # the in-context pass's logs: meta.json and the stores below
ICL_PROBES_STORE = "probes"
ICL_PAIRS_STORE = "pairs"
EMBEDDINGS_DIR = "embeddings"  # the selector's embedding store
WARMUP_DIR = "warmup"  # the Trainer's output_dir of the pool warm-up
LESS_DIR = "less"  # the LESS warm-up's project directory
LESS_TRAINER_DIR = "trainer_output"  # the Trainer's output_dir inside a LESS project directory


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


def index_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / INDEX_DIR


def index_file(run_dir: str | Path) -> Path:
    return index_dir(run_dir) / INDEX_FILE


def index_meta_file(run_dir: str | Path) -> Path:
    """What the index was built from and for (kind, mode, preconditioner, the store's checksum)."""
    return index_dir(run_dir) / INDEX_META_FILE


def index_norms_file(run_dir: str | Path) -> Path:
    """The train rows' H-norms a cosine / relative index divides by (exact re-ranking)."""
    return index_dir(run_dir) / INDEX_NORMS_FILE


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


def scoring_job_file(work_dir: str | Path) -> Path:
    """What a scoring work folder scores (a resumed call must match it)."""
    return Path(work_dir) / SCORING_JOB_FILE


def part_file(work_dir: str | Path, index: int) -> Path:
    """Part ``index``'s results (top-k, self-influence) in a scoring work folder."""
    return Path(work_dir) / PART_FILE.format(index=index)


def scores_part_file(work_dir: str | Path, index: int) -> Path:
    """Part ``index``'s columns of the score matrix in a scoring work folder."""
    return Path(work_dir) / SCORES_PART_FILE.format(index=index)


def is_scoring_part(name: str) -> bool:
    """Whether the file ``name`` of a scoring work folder is a part's file (or its temporary)."""
    prefixes = tuple(pattern.split("{")[0] for pattern in (PART_FILE, SCORES_PART_FILE))
    return name.startswith(prefixes + tuple(f".{prefix}" for prefix in prefixes))


def report_file(directory: str | Path) -> Path:
    return Path(directory) / REPORT_FILE


def model_run_dir(project_dir: str | Path) -> Path:
    """The run directory of ``logix extract`` (the model logged as it is) inside a project."""
    return Path(project_dir) / MODEL_RUN


def final_model_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / FINAL_MODEL_FILE


def trainer_dir(project_dir: str | Path) -> Path:
    return Path(project_dir) / TRAINER_DIR


def contribution_scores_file(directory: str | Path) -> Path:
    return Path(directory) / CONTRIBUTION_SCORES_FILE


def probes_file(directory: str | Path) -> Path:
    return Path(directory) / PROBES_FILE


def selection_dir(directory: str | Path) -> Path:
    return Path(directory) / SELECTION_DIR


def summary_file(directory: str | Path) -> Path:
    return Path(directory) / SUMMARY_FILE


def less_file(project_dir: str | Path) -> Path:
    return Path(project_dir) / LESS_FILE


def icl_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ICL_DIR


def icl_meta_file(run_dir: str | Path) -> Path:
    return icl_dir(run_dir) / ICL_META_FILE


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a logix run (its ``run.json``)."""
    return run_file(path).is_file()


# ---- one writer per directory (logix.store.guard) ----------------------------------------------
LOCK_FILE = "logix.lock"  # an OS lock (flock through filelock): held while a process writes
# beside it, ``logix.lock.json``: who holds it (pid, host, since), for the refusal message


def lock_file(directory: str | Path, suffix: str = "") -> Path:
    """The lock of ``directory`` (``suffix``: a rank's own lock in a store folder)."""
    return Path(directory) / f"{LOCK_FILE}{suffix}"


def lock_owner_file(directory: str | Path, suffix: str = "") -> Path:
    """Who holds the lock :func:`lock_file` names (pid, host, since)."""
    return lock_file(directory, suffix).with_name(f"{LOCK_FILE}{suffix}.json")


def is_logix_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory logix made: a run directory (``run.json``), a project
    directory (``job.yaml`` of ``logix run`` / ``logix contribute``, ``checkpoints.json`` of the
    Trainer callback), or one whose writer's lock logix created (a run interrupted before it wrote
    any of those): the only directories ``overwrite`` may delete."""
    return (is_run_dir(path) or job_file(path).is_file() or checkpoints_file(path).is_file()
            or lock_file(path).is_file())
