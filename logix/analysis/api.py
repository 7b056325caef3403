"""``influence()``: every train example's influence on each logged query of a run or project."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from logix.analysis.checkpoints import load_asymmetric_checkpoint, load_checkpoints, logged_queries
from logix.analysis.index import Index
from logix.analysis.influence import InfluenceResult, compute_influence
from logix.analysis.sharded import sharded_influence
from logix.config.choices import CheckpointWeighting, PreconditionerType, ScoreMode
from logix.config.damping import Damping
from logix.core.distributed import Dist
from logix.errors import LogixError
from logix.store.reader import Store
from logix.store.rundir import QUERY_STORE, checkpoints_file, scoring_dir, store_dir


def _influence_parts(run_dir, preconditioner, damping, mode, weighting, full_space_run, work_dir, part_rows,
                     overwrite, kwargs) -> InfluenceResult:
    kwargs = dict(kwargs)
    save_scores = bool(kwargs.pop("save_scores", False)) | (kwargs.pop("scores_path", None) is not None)
    if full_space_run is not None:
        cps = [load_asymmetric_checkpoint(run_dir, full_space_run, preconditioner, damping)]
        query_ids = Store(store_dir(full_space_run, QUERY_STORE)).ids
    else:
        cps, entries = load_checkpoints(run_dir, preconditioner, damping, weighting)
        query_ids = Store(store_dir(Path(run_dir) / entries[-1]["dir"], QUERY_STORE)).ids
    return sharded_influence(cps, work_dir, query_ids=query_ids, mode=mode, part_rows=part_rows,
                             save_scores=save_scores, overwrite=overwrite, **kwargs)


def influence(
    run_dir: str | Path,
    preconditioner: PreconditionerType | str = PreconditionerType.AUTO,
    damping: Damping | float | dict | None = None,
    mode: ScoreMode | str = ScoreMode.DOT,
    weighting: CheckpointWeighting | str = CheckpointWeighting.LR,
    full_space_run: str | Path | None = None,
    work_dir: str | Path | None = None,
    part_rows: int | None = None,
    overwrite_parts: bool = False,
    **kwargs,
) -> InfluenceResult:
    """Influence of every train example of ``run_dir`` on each of its logged queries.

    Args:
        run_dir: One run, or a Trainer callback's (or ``logix run``'s) project directory whose
            checkpoints are combined TracIn-style.
        preconditioner: ``identity``, ``raw``, ``raw-joint``, ``kfac`` or ``ekfac``; its statistics
            must have been logged.
        damping: A :class:`~logix.config.Damping`, a number (relative damping), or a dict of them
            by module name (``"*"``: every other module); None: the preconditioner's default.
        mode: ``dot``, ``cosine``, ``relative`` or ``unit`` (:class:`~logix.config.ScoreMode`).
        weighting: How several checkpoints combine: ``lr``, ``uniform`` or ``last``.
        full_space_run: Asymmetric preconditioning (:func:`load_asymmetric_checkpoint`): the
            queries are those of this ``projection: none`` run, preconditioned in full space with
            ``preconditioner`` and projected like ``run_dir``'s rows (one run, mode ``dot``).
        work_dir: Score in resumable parts there (:func:`logix.analysis.sharded.sharded_influence`);
            under ``torch.distributed`` this is always the case (default ``run_dir/scoring``) and
            the ranks share the parts. The full score matrix is then written with
            ``save_scores=True`` (or any ``scores_path``) to ``work_dir/scores.h5``, a virtual
            dataset over the parts.
        part_rows: Train rows per part when scoring in parts (default: chosen from the store's size).
        overwrite_parts: Discard the parts of an earlier scoring job in ``work_dir`` whose
            settings differ, instead of refusing.
        **kwargs (Any): Passed to :func:`compute_influence` (``top_k``, ``self_influence``,
            ``per_module``, ``scores_path``, ``memory_budget_mb``, ...). ``use_index=True``
            (with ``top_k``, optionally ``nprobe`` / ``rerank``) finds the top-k through the run's
            faiss index instead (``logix index``; :func:`index_influence`): exact scores of
            approximately selected rows, no self-influence; the exact scan stays the default.

    Returns:
        Per query its top proponents and opponents with their scores, and whatever ``kwargs``
        asked for (self-influence, per-module parts).

    Raises:
        LogixError: An option does not apply (``use_index`` with parts or a score matrix;
            ``full_space_run`` with a mode other than ``dot`` or with a checkpoint project).
        StatisticsError: The run lacks the statistics the preconditioner needs, or its queries
            were not committed.
    """
    if kwargs.pop("use_index", False):  # the run's faiss index (logix index): approximate top-k, exact scores
        if full_space_run is not None or work_dir is not None or Dist.current().active:
            raise LogixError("use_index=True scores through one run's index in one process: no full_space_run, "
                             "work_dir or torchrun.")
        if kwargs.get("scores_path") or kwargs.get("save_scores") or kwargs.get("per_module"):
            raise LogixError("use_index=True finds the top-k only: no score matrix (save_scores) or per-module "
                             "breakdown; score without the index for those.")
        return index_influence(run_dir, preconditioner, damping, mode, top_k=kwargs.pop("top_k", 10),
                               nprobe=kwargs.pop("nprobe", None), rerank=kwargs.pop("rerank", 10))
    if work_dir is not None or Dist.current().active:
        return _influence_parts(run_dir, preconditioner, damping, mode, weighting, full_space_run,
                                Path(work_dir or scoring_dir(run_dir)), part_rows, overwrite_parts, kwargs)
    if full_space_run is not None:
        if ScoreMode.parse(mode, "mode") is not ScoreMode.DOT:
            raise LogixError("Asymmetric preconditioning (full_space_run) scores in mode 'dot' only.")
        if checkpoints_file(run_dir).exists():
            raise LogixError("Asymmetric preconditioning (full_space_run) takes one run, not a checkpoint project.")
        cp = load_asymmetric_checkpoint(run_dir, full_space_run, preconditioner, damping)
        query_ids = Store(store_dir(full_space_run, QUERY_STORE)).ids
        return compute_influence(cp, query_ids=query_ids, mode=mode, **kwargs)
    cps, entries = load_checkpoints(run_dir, preconditioner, damping, weighting)
    query_ids = Store(store_dir(Path(run_dir) / entries[-1]["dir"], QUERY_STORE)).ids
    return compute_influence(cps, query_ids=query_ids, mode=mode, **kwargs)


def index_run_dir(path: str | Path) -> Path:
    """The run directory an index serves: ``path`` itself, or a project's only logged checkpoint.

    Args:
        path: A run directory, or a project directory with ``checkpoints.json``.

    Returns:
        The run directory.

    Raises:
        LogixError: The project logged several checkpoints (an index serves one run).
    """
    path = Path(path)
    index_json = checkpoints_file(path)
    if not index_json.exists():
        return path
    entries = json.loads(index_json.read_text())["checkpoints"]
    if len(entries) != 1:
        raise LogixError(f"{path} logged {len(entries)} checkpoints; an index serves one run: give one "
                         f"checkpoint's run directory ({', '.join(str(path / e['dir']) for e in entries)}).")
    return path / entries[0]["dir"]


def index_influence(run_dir: str | Path, preconditioner: PreconditionerType | str = PreconditionerType.AUTO,
                    damping: Damping | None = None, mode: ScoreMode | str = ScoreMode.DOT, top_k: int = 10,
                    nprobe: int | None = None, rerank: int = 10, queries: Tensor | None = None,
                    query_ids: list | None = None) -> InfluenceResult:
    """``influence(..., use_index=True)``: the top-k proponents and opponents of each logged query
    through ``run_dir``'s index (exact scores, approximate selection; no self-influence).

    Args:
        run_dir: The run (or a project of one checkpoint) whose index ``logix index`` built.
        preconditioner: As for :func:`influence`.
        damping: As for :func:`influence` (one damping).
        mode: The mode the index was built for.
        top_k: Proponents and opponents kept per query.
        nprobe: Index cells searched (``ivf*`` indexes; default ``max(1, nlist // 64)``).
        rerank: Candidates fetched per result kept, then re-scored exactly.
        queries: ``(n, dim)`` query rows projected like the run's (default: its logged queries).
        query_ids: Their ids (with ``queries``).

    Returns:
        The top-k of each query (no score matrix, no self-influence).

    Raises:
        LogixError: The index serves another mode, or the project logged several checkpoints.
    """
    run_dir = index_run_dir(run_dir)
    index = Index.load(run_dir)
    mode = ScoreMode.parse(mode, "mode")
    if mode is not index.mode:
        raise LogixError(f"The index of {run_dir} serves mode {index.mode.value!r}, not {mode.value!r}: rebuild it "
                         f"with `logix index {run_dir} --mode {mode.value}`.")
    if queries is None:
        store = logged_queries(run_dir)
        queries, query_ids = store.read_all(), store.ids
    kind = PreconditionerType.parse(preconditioner, "preconditioner")
    damping = damping if damping is None or isinstance(damping, Damping) else Damping(float(damping))
    top = index.search(queries, top_k, kind, damping, nprobe=nprobe, rerank=rerank)
    bottom = index.search(queries, top_k, kind, damping, largest=False, nprobe=nprobe, rerank=rerank)
    return InfluenceResult(list(query_ids), index.store.ids, top.ids, top.scores, bottom.ids, bottom.scores,
                           top_index=top.index, bottom_index=bottom.index)
