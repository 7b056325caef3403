"""Sharded, resumable scoring: ranks score disjoint parts of the train store against all queries.

The train store is cut into *parts* of consecutive rows whose boundaries depend only on the
store and ``part_rows``, never on the number of processes. Part ``i`` belongs to rank
``i % world_size``; each rank scores its parts with :func:`~logix.analysis.compute_influence`
restricted to the part's rows and commits, per part, one small result file (its top-k
proponents and opponents with global row indices, and its rows' self-influence) written
under a temporary name and renamed. A part whose result file exists is done: a call
interrupted mid-way (a crash, a killed rank, a pre-empted job) redoes only the parts without
one, with any number of processes. The results are then merged exactly: the global top-k of a
query is the top-k of the union of every part's top-k.

``work_dir`` holds::

    job.json                  what is scored (stores, queries, settings); a resumed call must match
    part-000012.safetensors   part 12's top-k values / global indices and self-influence
    scores-000012.h5          part 12's columns of the score matrix (``save_scores=True``)
    scores.h5                 one (n_query x n_train) HDF5 virtual dataset over the part files

The full score matrix is thus written by parts without two processes ever writing one file;
``scores.h5`` reads as one matrix through h5py (keep the part files beside it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from logix.analysis.influence import (
    Checkpoint,
    InfluenceResult,
    compute_influence,
    module_breakdown,
    prepare_queries,
)
from logix.analysis.kernels import best_k
from logix.config.choices import ScoreMode
from logix.core.checksum import load_tensors, save_tensors
from logix.core.distributed import Dist
from logix.core.progress import progress_bar
from logix.errors import LogixError
from logix.store.format import fsync_dir, fsync_file, write_json_atomic
from logix.store.rundir import (
    is_scoring_part,
    part_file,
    scores_file,
    scores_part_file,
    scoring_job_file,
)
from logix.store.scores import write_virtual_score_matrix


def plan_parts(n_train: int, part_rows: int) -> list[tuple[int, int]]:
    """Row ranges ``(lo, hi)`` of ``part_rows`` rows (the last may be shorter) covering the store."""
    if part_rows <= 0:
        raise LogixError(f"part_rows must be positive, got {part_rows}.")
    return [(lo, min(lo + part_rows, n_train)) for lo in range(0, n_train, part_rows)]


def default_part_rows(n_train: int) -> int:
    """About 64 parts (at least 4,096 rows each): enough for balance across ranks and for
    fine-grained resumption, few enough that each part's GEMMs stay large."""
    return max(4096, -(-n_train // 64))


def sharded_influence(
    checkpoints: Checkpoint | Sequence[Checkpoint],
    work_dir: str | Path,
    query_ids: Sequence | None = None,
    mode: ScoreMode | str = ScoreMode.DOT,
    top_k: int = 10,
    part_rows: int | None = None,
    save_scores: bool = False,
    self_influence: bool = True,
    per_module: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    memory_budget_mb: float = 512.0,
    chunk_rows: int | None = None,
    query_batch: int | None = None,
    overwrite: bool = False,
    dist: Dist | None = None,
) -> InfluenceResult:
    """Score every (query, train) pair like :func:`compute_influence`, split into parts that
    the ranks of the ``torch.distributed`` group (or one process) score, resumably.

    Every rank returns the same merged :class:`InfluenceResult` (top-k, self-influence, and
    ``scores_path`` = ``work_dir/scores.h5`` with ``save_scores``).

    Args:
        work_dir: where part results live; an interrupted call resumes from it.
        part_rows: rows per part (default :func:`default_part_rows`); fixed for a ``work_dir``.
        overwrite: discard the results in ``work_dir`` of a different scoring job instead of
            raising.
        dist: the process group (default: the initialised one, else a single process).

    The other arguments are those of :func:`compute_influence`.
    """
    cps = [checkpoints] if isinstance(checkpoints, Checkpoint) else list(checkpoints)
    if not cps:
        raise LogixError("sharded_influence needs at least one checkpoint.")
    dist = dist or Dist.current()
    mode = ScoreMode.parse(mode, "mode")
    work_dir = Path(work_dir)
    train = cps[0].train
    n_train, n_query = train.n_rows, cps[0].queries.shape[0]
    if n_train == 0:
        raise LogixError(f"The train store {train.directory} has no committed rows to score.")
    qids = list(range(n_query)) if query_ids is None else list(query_ids)
    part_rows = part_rows or default_part_rows(n_train)
    parts = plan_parts(n_train, part_rows)
    job = _job_record(cps, qids, mode, top_k, part_rows, dtype, save_scores)
    dist.on_main(lambda: _prepare(work_dir, job, overwrite))
    mine = [i for i in range(len(parts)) if i % dist.world_size == dist.rank]
    todo = [i for i in mine if not part_file(work_dir, i).exists()]
    error = None
    try:
        bar = progress_bar(todo, desc=f"influence parts (rank {dist.rank})", unit="part",
                           enabled=progress and bool(todo))
        for i in bar:
            _score_part(cps, qids, mode, top_k, parts[i], i, work_dir, save_scores, dtype,
                        memory_budget_mb, chunk_rows, query_batch)
    except BaseException as exc:  # the other ranks must not wait for this one at the merge
        error = exc
    dist.raise_anywhere(error)
    missing = [i for i in range(len(parts)) if not part_file(work_dir, i).exists()]
    if missing:
        raise LogixError(f"{work_dir}: parts {missing[:5]} have no result; run the scoring again to finish them.")
    result = _merge(work_dir, len(parts), qids, train.ids, top_k)
    if save_scores:
        dist.on_main(lambda: _virtual_scores(work_dir, parts, n_query))
        result.scores_path = scores_file(work_dir)
    if per_module:
        queries, norms = prepare_queries(cps, mode)
        result.per_module = module_breakdown(cps, queries, result.top_index, mode, norms, result.self_influence)
    if not self_influence:
        result.self_influence = None
    dist.barrier()
    return result


def _job_record(cps, qids, mode, top_k, part_rows, dtype, save_scores) -> dict:
    digest = hashlib.blake2b(digest_size=16)
    for cp in cps:
        digest.update(str(cp.train.directory.resolve()).encode())
        digest.update(json.dumps([str(i) for i in cp.train.ids]).encode())
        digest.update(cp.queries.detach().to(torch.float64).contiguous().numpy().tobytes())
        digest.update(repr((cp.preconditioner.kind, _damping_text(cp), cp.weight)).encode())
    digest.update(json.dumps([str(q) for q in qids]).encode())
    return {
        "digest": digest.hexdigest(), "mode": mode.value, "top_k": top_k, "part_rows": part_rows,
        "dtype": str(dtype), "save_scores": save_scores, "n_train": cps[0].train.n_rows,
        "n_query": int(cps[0].queries.shape[0]), "checkpoints": len(cps),
    }


def _damping_text(cp: Checkpoint) -> str:
    pre = cp.preconditioner
    return repr(getattr(pre, "damping", None))


def _prepare(work_dir: Path, job: dict, overwrite: bool) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    path = scoring_job_file(work_dir)
    if path.exists():
        old = json.loads(path.read_text())
        if old == job:
            return
        if not overwrite:
            changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise LogixError(
                f"{work_dir} holds the parts of another scoring job (differs in {changed}). Use another "
                "work_dir, or overwrite=True (--overwrite) to discard them."
            )
        for child in work_dir.iterdir():
            if is_scoring_part(child.name) or child == scores_file(work_dir):
                child.unlink()
    write_json_atomic(path, job)


def _score_part(cps, qids, mode, top_k, rows, index, work_dir, save_scores, dtype, budget, chunk_rows,
                query_batch) -> None:
    final = scores_part_file(work_dir, index)
    scores_tmp = final.with_name(f".{final.name}.tmp") if save_scores else None
    result = compute_influence(
        cps, query_ids=qids, mode=mode, top_k=top_k, memory_budget_mb=budget, chunk_rows=chunk_rows,
        query_batch=query_batch, scores_path=scores_tmp, self_influence=True, per_module=False,
        progress=False, dtype=dtype, rows=rows,
    )
    if scores_tmp is not None:
        fsync_file(scores_tmp)
        os.replace(scores_tmp, final)
    tensors = {
        "top_scores": result.top_scores.contiguous(),
        "top_index": result.top_index.contiguous(),
        "bottom_scores": result.bottom_scores.contiguous(),
        "bottom_index": result.bottom_index.contiguous(),
        "self_influence": result.self_influence.contiguous(),
        "rows": torch.tensor(rows, dtype=torch.int64),
    }
    done = part_file(work_dir, index)
    tmp = done.with_name(f".{done.name}.tmp")
    save_tensors(tmp, tensors)
    fsync_file(tmp)
    os.replace(tmp, done)  # the part is done once this name exists
    fsync_dir(work_dir)


def _merge(work_dir: Path, n_parts: int, qids: list, train_ids: list, top_k: int) -> InfluenceResult:
    tops, tops_i, bots, bots_i, selfs = [], [], [], [], []
    for i in range(n_parts):
        part = load_tensors(part_file(work_dir, i))
        tops.append(part["top_scores"])
        tops_i.append(part["top_index"])
        bots.append(part["bottom_scores"])
        bots_i.append(part["bottom_index"])
        selfs.append(part["self_influence"])
    top_v, top_i = best_k(torch.cat(tops, 1), torch.cat(tops_i, 1), top_k, largest=True)
    bot_v, bot_i = best_k(torch.cat(bots, 1), torch.cat(bots_i, 1), top_k, largest=False)
    self_inf = torch.cat(selfs)
    return InfluenceResult(
        qids, train_ids,
        [[train_ids[j] for j in row] for row in top_i.tolist()], top_v,
        [[train_ids[j] for j in row] for row in bot_i.tolist()], bot_v,
        self_inf, top_index=top_i, bottom_index=bot_i,
    )


def _virtual_scores(work_dir: Path, parts: list[tuple[int, int]], n_query: int) -> None:
    """``scores.h5``: one (n_query x n_train) virtual dataset mapping every part file's columns."""
    files = [(scores_part_file(work_dir, i).name, lo, hi) for i, (lo, hi) in enumerate(parts)]
    write_virtual_score_matrix(scores_file(work_dir), files, n_query)
