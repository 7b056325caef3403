"""Streaming influence scores: ``score(q, t) = precondition(g_q) . g_t`` for every pair.

The train store is streamed in chunks whose size follows a memory budget (independent of
``n_train``); each chunk costs one GEMM against the preconditioned queries. Kept in memory:
the top-k proponents (largest scores) and opponents (smallest) of each query and, when asked,
every train row's self-influence. The full ``n_query x n_train`` matrix can be streamed to HDF5.

Sign and scale: a positive score means that up-weighting the train example would *decrease*
the query's loss (``g_q^T H^-1 g_t > 0``: a gradient step on the train example is a descent
step for the query), i.e. the train example is a proponent. See docs/influence.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from logix.analysis.kernels import (
    Scratch,
    TopK,
    budget_chunk_rows,
    normalise,
    row_dots,
    score_block,
    score_coded,
    self_influence_rows,
    unit_rows,
)
from logix.analysis.precondition import Preconditioner
from logix.config.choices import PreconditionerType, ScoreMode
from logix.core.progress import progress_bar
from logix.errors import LogixError
from logix.store.reader import Store
from logix.store.scores import ScoreMatrixWriter


@dataclass
class Checkpoint:
    """Logs of one checkpoint: train store, query rows, preconditioner, and its weight.

    Attributes:
        train: The checkpoint's train store.
        queries: ``(n_query, dim)`` query rows, projected like the train rows.
        preconditioner: Applied to the query rows (and, for self-influence, the train rows).
        weight: The checkpoint's weight in a sum over checkpoints (TracIn-style).
    """

    train: Store
    queries: Tensor  # (n_query, dim) logged query rows
    preconditioner: Preconditioner
    weight: float = 1.0


@dataclass
class InfluenceResult:
    """Top-k proponents/opponents per query, self-influence, and where the full matrix went.

    Attributes:
        query_ids: The queries' ids.
        train_ids: The train rows' ids, in store order.
        top_ids: Per query, the ids of its top-k proponents (highest score first).
        top_scores: ``(n_query, k)`` their scores, descending.
        bottom_ids: Per query, the ids of its top-k opponents (most negative first).
        bottom_scores: ``(n_query, k)`` their scores, ascending.
        self_influence: ``(n_train,)`` ``g^T H^-1 g`` of every train row, when asked for.
        per_module: Module name to ``(n_query, k)``: each module's part of the scores of
            ``top_ids`` (the parts sum to the score), when asked for.
        scores_path: The HDF5 file the full ``(n_query, n_train)`` matrix was written to, if any.
        top_index: ``(n_query, k)`` train-row positions of ``top_ids``.
        bottom_index: ``(n_query, k)`` train-row positions of ``bottom_ids``.
    """

    query_ids: list
    train_ids: list
    top_ids: list[list]
    top_scores: Tensor  # (n_query, k), descending
    bottom_ids: list[list]
    bottom_scores: Tensor  # (n_query, k), ascending (most negative first)
    self_influence: Tensor | None = None  # (n_train,)
    per_module: dict[str, Tensor] = field(default_factory=dict)  # module -> (n_query, k) for top_ids
    scores_path: Path | None = None
    top_index: Tensor | None = None  # (n_query, k) global train-row indices of top_ids
    bottom_index: Tensor | None = None  # (n_query, k) global train-row indices of bottom_ids

    def to_records(self) -> list[dict]:
        """One JSON-ready record per query."""
        out = []
        for q, qid in enumerate(self.query_ids):
            out.append({
                "query_id": qid,
                "proponents": [{"id": i, "score": float(s)} for i, s in zip(self.top_ids[q], self.top_scores[q])],
                "opponents": [{"id": i, "score": float(s)} for i, s in zip(self.bottom_ids[q], self.bottom_scores[q])],
            })
        return out

    def to_pandas(self, train_texts=None, query_texts=None):
        """The top-k lists as a tidy pandas DataFrame, one row per (query, kind, rank).

        Columns ``query_index``, ``query_id``, ``kind`` (``proponent`` / ``opponent``), ``rank``
        (1 = strongest of its kind), ``train_id``, ``train_index``, ``score``; ``train_texts`` /
        ``query_texts`` (a mapping id -> text, or a sequence aligned with the ids) add
        ``train_text`` / ``query_text``. The dense matrix: :meth:`scores_frame`; self-influence:
        :meth:`self_influence_series`. Needs pandas (``pip install 'logix-attribution[pandas]'``).
        """
        from logix.analysis.frames import influence_frame

        return influence_frame(self, train_texts, query_texts)

    def scores_frame(self):
        """The full score matrix (kept with ``scores_path=``) as a DataFrame: query ids x train ids."""
        from logix.analysis.frames import score_matrix_frame

        return score_matrix_frame(self)

    def self_influence_series(self):
        """Self-influence as a pandas Series indexed by train id."""
        from logix.analysis.frames import self_influence_series

        return self_influence_series(self)


def compute_influence(
    checkpoints: Checkpoint | Sequence[Checkpoint],
    query_ids: Sequence | None = None,
    mode: ScoreMode | str = ScoreMode.DOT,
    top_k: int = 10,
    memory_budget_mb: float = 512.0,
    chunk_rows: int | None = None,
    query_batch: int | None = None,
    scores_path: str | Path | None = None,
    self_influence: bool = True,
    per_module: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
) -> InfluenceResult:
    """Score every (query, train) pair, streaming the train store(s).

    Args:
        checkpoints: one :class:`Checkpoint`, or several whose weighted scores are summed
            (TracIn-style; their train stores must hold the same ids in the same order).
        query_ids: ids of the query rows (default ``0..n_query-1``).
        mode: ``dot`` | ``cosine`` | ``relative`` | ``unit`` (see :class:`ScoreMode`).
        top_k: proponents and opponents kept per query.
        memory_budget_mb: bound on the memory of the streamed chunks, the preconditioned
            queries and their scores, whatever ``n_train``.
        chunk_rows: fixed chunk size (overrides the budget).
        query_batch: queries scored per pass over the train store (default: as many as fit in
            half the budget).
        scores_path: write the full score matrix (``scores``, n_query x n_train) to this HDF5 file.
        self_influence: also return ``g_t^T H^-1 g_t`` for every train row.
        per_module: per-module contributions of the top-k proponents' scores.
        dtype: dtype of the score GEMM (preconditioning always runs in float64);
            ``torch.float64`` for reference-grade scores at about half the speed.
        rows: score only the train rows ``lo:hi`` of the store (a part, as the sharded scorer
            hands each rank); top-k indices stay global, ``self_influence`` and the columns of
            the score matrix cover the part only.
    """
    cps = [checkpoints] if isinstance(checkpoints, Checkpoint) else list(checkpoints)
    mode = ScoreMode.parse(mode, "mode")
    _check_checkpoints(cps)
    n_query, dim = cps[0].queries.shape[0], cps[0].train.dim * len(cps)
    train_ids = cps[0].train.ids
    lo, hi = (0, len(train_ids)) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= lo <= hi <= len(train_ids):
        raise LogixError(f"rows={rows} is outside the train store's {len(train_ids)} rows.")
    n_train = hi - lo
    qids = list(range(n_query)) if query_ids is None else list(query_ids)
    if len(qids) != n_query:
        raise LogixError(f"{len(qids)} query ids for {n_query} query rows.")
    need_self = self_influence or mode in (ScoreMode.COSINE, ScoreMode.RELATIVE)
    batch = query_batch or max(1, int(memory_budget_mb * 2**20 / 2 // (dim * 8 * 2)))
    batch = min(batch, n_query)
    rows_per_chunk = chunk_rows or budget_chunk_rows(dim, batch, memory_budget_mb / 2, 2)
    queries, q_norms = prepare_queries(cps, mode)
    queries = [q.to(dtype) for q in queries]
    state = _Stream(n_query, n_train, top_k, need_self, scores_path)
    try:
        for q0 in range(0, n_query, batch):
            _stream(cps, queries, q_norms, slice(q0, min(q0 + batch, n_query)), mode, rows_per_chunk, state, progress,
                    lo, hi)
    except BaseException:
        state.close(commit=False)  # no partial score matrix at scores_path
        raise
    state.close()
    top, bottom = state.top, state.bottom
    result = InfluenceResult(
        qids, train_ids,
        [[train_ids[i] for i in row] for row in top.index.tolist()], top.values64,
        [[train_ids[i] for i in row] for row in bottom.index.tolist()], bottom.values64,
        state.self_inf if self_influence else None,
        scores_path=None if scores_path is None else Path(scores_path),
        top_index=top.index, bottom_index=bottom.index,
    )
    if per_module:
        result.per_module = module_breakdown(cps, queries, top.index, mode, q_norms, state.self_inf)
    return result


class _Stream:
    """What the passes over the train store accumulate."""

    def __init__(self, n_query: int, n_train: int, top_k: int, need_self: bool, scores_path) -> None:
        self.top, self.bottom = TopK(n_query, top_k, True), TopK(n_query, top_k, False)
        self.self_inf = torch.zeros(n_train, dtype=torch.float64) if need_self else None
        self.self_done = not need_self
        self.matrix = None if scores_path is None else ScoreMatrixWriter(scores_path, n_query, n_train)

    def close(self, commit: bool = True) -> None:
        if self.matrix is not None:
            self.matrix.close(commit)


def _stream(cps, queries, q_norms, rows: slice, mode, chunk_rows: int, state: _Stream, progress: bool,
            lo: int = 0, hi: int | None = None) -> None:
    """One pass over the train rows ``lo:hi`` for the queries ``rows``."""
    sub = [q[rows] for q in queries]
    norms = None if q_norms is None else q_norms[rows]
    top, bottom = TopK(len(sub[0]), state.top.k, True), TopK(len(sub[0]), state.top.k, False)
    # Shard-aligned chunks: zero-copy memory maps of the shard files, scored in place (no copy of
    # the rows out of the page cache; on a 2-core machine the copy cost as much as the GEMM:
    # docs/benchmarks.md). Several checkpoints' stores chunk alike only when their shards do;
    # otherwise chunks of exactly chunk_rows rows are read into reused buffers.
    hi = cps[0].train.n_rows if hi is None else hi
    aligned = len({tuple(cp.train.shard_rows) for cp in cps}) == 1
    streams = [cp.train.iter_chunks(chunk_rows, start=lo, stop=hi, align_to_shards=aligned, coded=True) for cp in cps]
    bar = progress_bar(total=hi - lo, desc="influence", unit="row", enabled=progress)
    scratch = Scratch()
    for chunks in zip(*streams):
        start, n = chunks[0].start, len(chunks[0])
        at = start - lo  # column of this chunk in the part's outputs
        compute_self = not state.self_done
        scores, s_inf = _score_chunk(cps, sub, chunks, mode, compute_self, scratch)
        if compute_self:
            state.self_inf[at : at + n] = s_inf
        elif state.self_inf is not None:
            s_inf = state.self_inf[at : at + n]
        scores = normalise(scores, mode, norms, s_inf)
        top.update(scores, start)
        bottom.update(scores, start)
        if state.matrix is not None:
            state.matrix.write(rows, at, scores.numpy())
        bar.update(n)
    bar.close()
    state.self_done = True
    for full, part in ((state.top, top), (state.bottom, bottom)):
        if full.values.shape[1] != part.values.shape[1]:
            full.values = full.values.new_zeros(full.values.shape[0], part.values.shape[1])
            full.index = full.index.new_zeros(full.index.shape[0], part.index.shape[1])
        full.values[rows] = part.values
        full.index[rows] = part.index


def _check_checkpoints(cps: list[Checkpoint]) -> None:
    if not cps:
        raise LogixError("compute_influence needs at least one checkpoint.")
    ref = cps[0]
    for cp in cps:
        if cp.queries.dim() != 2 or cp.queries.shape[1] != cp.train.dim:
            raise LogixError(
                f"Query rows have shape {tuple(cp.queries.shape)} but the train store has rows of "
                f"{cp.train.dim} values: log queries with the same run (run.log_queries)."
            )
        if cp.queries.shape[0] != ref.queries.shape[0]:
            raise LogixError("Every checkpoint must hold the same queries.")
        if cp is not ref and cp.train.ids != ref.train.ids:
            raise LogixError("Checkpoints' train stores must hold the same ids in the same order.")


def prepare_queries(cps: list[Checkpoint], mode: ScoreMode) -> tuple[list[Tensor], Tensor | None]:
    """Preconditioned, weighted query rows per checkpoint, and their H-norms for cosine."""
    prepared, norm_sq = [], None
    for cp in cps:
        q = unit_rows(cp.queries) if mode is ScoreMode.UNIT else cp.queries.to(torch.float64)
        pq = cp.preconditioner(q)
        prepared.append(pq * cp.weight)
        if mode is ScoreMode.COSINE:
            part = cp.weight * (pq * q).sum(1)
            norm_sq = part if norm_sq is None else norm_sq + part
    return prepared, None if norm_sq is None else norm_sq.clamp_min(0).sqrt()


def _score_chunk(cps, queries, chunks, mode, need_self, scratch=None) -> tuple[Tensor, Tensor | None]:
    scores, s_inf = None, None
    scratch = scratch or Scratch()
    # dot scores of one checkpoint need no float64 arithmetic: top-k runs on the GEMM's own output
    # (the same values, so the same selection) and only the selected values become float64
    exact32 = mode is ScoreMode.DOT and len(cps) == 1
    for cp, pq, chunk in zip(cps, queries, chunks):
        key = "scores" if scores is None else "part"
        identity = cp.preconditioner.kind is PreconditionerType.IDENTITY
        if chunk.coded is not None and pq.dtype == torch.float32 and (identity or not need_self):
            # quantized rows scored from their codes (no float32 copy); identity H: norms from them too
            part, sq_norms = score_coded(pq, chunk.coded, scratch, key, mode is ScoreMode.UNIT or need_self)
            if not exact32:
                part = scratch.named(key, part.shape, torch.float64).copy_(part)
            rows = None
        else:
            rows = chunk.rows
            part = score_block(pq, rows, scratch, key, as_float64=not exact32)
            sq_norms = row_dots(rows, None, scratch) if mode is ScoreMode.UNIT else None
        if mode is ScoreMode.UNIT:  # score of unit rows = score of rows / their norm (no unit copy)
            part /= sq_norms.sqrt().clamp_min(1e-30)[None, :]
        scores = part if scores is None else scores.add_(part)  # accumulated in the "scores" buffer
        if need_self:
            s = sq_norms.clone() if rows is None else self_influence_rows(cp.preconditioner, rows, scratch)
            if mode is ScoreMode.UNIT:
                s /= sq_norms.sqrt().clamp_min(1e-30) ** 2
            s = cp.weight * s
            s_inf = s if s_inf is None else s_inf + s
    return scores, s_inf


def module_breakdown(cps, queries, top_index, mode, q_norms, self_inf) -> dict[str, Tensor]:
    """Per-module parts of each top-k score (they sum to the score)."""
    out: dict[str, Tensor] = {}
    for cp, pq in zip(cps, queries):
        train_ids = cp.train.ids
        for q in range(top_index.shape[0]):
            idx = top_index[q].tolist()
            rows = cp.train.get([train_ids[i] for i in idx]).to(torch.float64)
            if mode is ScoreMode.UNIT:
                rows = unit_rows(rows)
            for block in cp.train.layout.blocks:
                part = rows[:, block.columns] @ pq[q, block.columns].to(torch.float64)
                if mode is ScoreMode.RELATIVE:
                    part = part / self_inf[idx].clamp_min(1e-30).sqrt()
                elif mode is ScoreMode.COSINE:
                    part = part / (q_norms[q] * self_inf[idx].clamp_min(1e-30).sqrt())
                slot = out.setdefault(block.name, torch.zeros(top_index.shape, dtype=torch.float64))
                slot[q] += part
    return out
