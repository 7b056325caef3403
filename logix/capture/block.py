"""One ``with run(...)`` block: its hooks, and the rows and statistics it adds to the run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logix.capture.engine import BatchCapture, BatchResult
from logix.capture.finite import screen
from logix.capture.passes import active_spec, query_spec
from logix.capture.spec import PassName, PassSpec, Space
from logix.capture.state import RunState
from logix.config import LossReduction
from logix.core.dtypes import row_dtype
from logix.core.projection import ModuleProjection
from logix.core.statistics import JOINT
from logix.errors import BatchError, PlanError, WatchError
from logix.store.rundir import TRAIN_STORE
from logix.store.runinfo import normalise_ids


class LogContext:
    """``with run(data_id=..., mask=...):`` — captures one batch; hooks removed on exit.

    ``store=None`` (``run.capture(...)``): query rows kept in memory, nothing written; after the
    block ``rows`` holds them (float32, one per example, or per token) and ``row_ids`` their ids.

    Made by calling the run (``run(...)``, :meth:`Run.log_queries`, :meth:`Run.capture`), not
    directly; the arguments are those of :meth:`Run.__call__`.

    Args:
        state: The run's shared state.
        data_id: One id per example of the batch.
        mask: ``(batch, seq_len)`` 0/1 tensor; padding tokens (0) contribute nothing.
        store: The store the rows go to (``train``, ``queries``), or None to keep them in memory.
        loss_reduction: ``sum`` or ``mean`` over the batch's examples.
        loss_scale: What else the loss was divided by.
    """

    def __init__(self, state: RunState, data_id: Any, mask: Tensor | None, store: str = TRAIN_STORE,
                 loss_reduction: LossReduction | str = LossReduction.SUM, loss_scale: float = 1.0) -> None:
        self.state = state
        self.data_id = data_id
        self.mask = mask
        self.store = store
        self.reduction = LossReduction.parse(loss_reduction, "loss_reduction")
        self.loss_scale = _check_scale(loss_scale)
        self.spec: PassSpec | None = None
        self.ids: list | None = None
        self.keep: Tensor | None = None
        self.skipped = False
        self.rows: Tensor | None = None
        self.row_ids: list | None = None
        self._capture: BatchCapture | None = None

    def __enter__(self) -> LogContext:
        capture = begin_batch(self.state, self)
        if capture is not None:
            capture.attach()
        self._capture = capture
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        capture, self._capture = self._capture, None
        if capture is None:
            return
        try:
            if exc_type is None:
                end_batch(self.state, self, capture)
        finally:
            capture.detach()


def _query_spec(state: RunState, store: str | None) -> PassSpec:
    state.require_watch()
    if not state.info.finalized:
        raise PlanError("Log (or capture) queries after the training rows: call run.finalize() first.")
    if store is not None and store not in state.sinks:
        state.open_sink(store)
    return query_spec(state.config)


def _check_scale(scale: Any) -> float:
    if isinstance(scale, Tensor):
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise BatchError(f"loss_scale must be a positive finite number (what the loss was divided by), got {scale!r}.")
    return float(scale)


def begin_batch(state: RunState, ctx: LogContext) -> BatchCapture | None:
    """The (not yet attached) capture of the block ``ctx``; None when every id is stored already."""
    state.guard.check()  # before this session's first block: the model the directory's rows describe
    spec = active_spec(state) if ctx.store == TRAIN_STORE else _query_spec(state, ctx.store)
    ctx.spec = spec
    ids, keep = None, None
    if spec.gradients and spec.rows:
        if ctx.data_id is None:
            raise BatchError("data_id is required while logging rows: pass one id per example.")
        ids, id_type = normalise_ids(ctx.data_id)
        if ctx.store is None:  # in memory: every example, nothing to resume
            keep = torch.ones(len(ids), dtype=torch.bool)
        else:
            sink = state.sinks[ctx.store]
            sink.check_id_type(id_type)
            keep = sink.keep_mask(ids)
        if not keep.any():
            ctx.skipped = True
            return None
    elif ctx.data_id is not None:
        ids, _ = normalise_ids(ctx.data_id)
    mask = ctx.mask
    if mask is not None:
        mask = check_mask(mask, None if ids is None else len(ids))
    ctx.ids = ids
    ctx.keep = keep
    projections = state.projections
    if spec.space is Space.FULL:
        projections = {n: ModuleProjection(None, None) for n in state.names()}
    scale = ctx.loss_scale
    if ctx.reduction is LossReduction.MEAN:
        if ids is None and ctx.mask is None:
            raise BatchError("loss_reduction='mean' needs the batch size: pass data_id (or mask).")
        scale *= len(ids) if ids is not None else ctx.mask.shape[0]
    return BatchCapture(
        state.watched, projections, spec, None if ids is None else len(ids), mask,
        None if keep is None or bool(keep.all()) else keep, state.compute_dtype, scale,
    )


def check_mask(mask: Tensor, n_ids: int | None) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dim() < 1:
        raise BatchError("mask must be a tensor shaped like the model input (batch, seq_len).")
    if n_ids is not None and mask.shape[0] != n_ids:
        raise BatchError(f"mask has {mask.shape[0]} rows but data_id has {n_ids} ids.")
    if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
        raise BatchError("mask must hold only 0 and 1 (1 = real token, 0 = padding).")
    return mask.to(torch.bool)


def end_batch(state: RunState, ctx: LogContext, capture: BatchCapture) -> None:
    """Add what the block captured to the run: statistics, gradient statistics, rows."""
    result = capture.finish()
    screen(state, ctx, result)  # NaN / Inf: refused (nothing of the batch kept) or dropped
    spec = ctx.spec
    if spec.name is PassName.QUERIES:
        _record_rows(state, ctx, result)
        return
    if spec.space is Space.FULL:
        state.full_stats.merge(result.stats)
        return
    state.stats.merge(result.stats)
    if not spec.gradients:
        return
    if spec.gradient_stats:
        grads = {n: g.detach().to("cpu") for n, g in result.grads.items()}
        keep = ctx.keep if ctx.keep is not None else torch.ones(len(next(iter(grads.values()))), dtype=torch.bool)
        _update_gradient_stats(state, grads, keep)
    if spec.rows:
        _record_rows(state, ctx, result)


def _record_rows(state: RunState, ctx: LogContext, result: BatchResult) -> None:
    keep = ctx.keep
    if not bool(keep.any()):  # every example was dropped (capture.nonfinite: skip)
        return
    grads = {n: g.detach().to("cpu") for n, g in result.grads.items()}
    new_ids = [i for i, k in zip(ctx.ids, keep.tolist()) if k]
    ids = new_ids
    store_dtype = row_dtype(state.config.store.dtype)
    if result.token_grads is None:
        rows = torch.cat([grads[n].flatten(1) for n in state.names()], dim=1)
        if len(new_ids) < len(ctx.ids):
            rows = rows[keep]
        positions = None
    else:
        rows, ids, positions = _token_rows(state, ctx, result, keep)
    if ctx.store is None:
        ctx.rows, ctx.row_ids = rows.to(torch.float32), ids
        return
    state.sinks[ctx.store].add(rows.to(store_dtype), ids, positions, new_ids)


def _token_rows(state: RunState, ctx: LogContext, result: BatchResult, keep: Tensor):
    tok = {n: t.detach().to("cpu") for n, t in result.token_grads.items()}
    names = state.names()
    first = tok[names[0]]
    batch, n_tok = first.shape[:2]
    valid = keep[:, None].expand(batch, n_tok).clone()
    if ctx.mask is not None:
        valid &= ctx.mask.to("cpu", torch.bool).reshape(batch, n_tok)
    rows = torch.cat([tok[n][valid].flatten(1) for n in names], dim=1)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    ids = [ctx.ids[b] for b in b_idx.tolist()]
    return rows, ids, t_idx.numpy().astype(np.int64)


def _update_gradient_stats(state: RunState, grads: dict[str, Tensor], keep: Tensor) -> None:
    cfg = state.config.statistics
    stats = state.stats
    n_new = float(keep.sum())
    dtype = state.accum_dtype
    ekfac = cfg.ekfac and not state.current.ekfac_from_rows  # else from the stored rows after the pass
    for name in state.names():
        g = grads[name][keep].to(dtype) if ekfac or cfg.raw else None
        if ekfac:
            q_a = stats.raw_sum(name, "A_evecs").to(dtype)
            q_s = stats.raw_sum(name, "S_evecs").to(dtype)
            rotated = q_s.T @ g @ q_a
            stats.add(name, "ekfac", (rotated**2).sum(0))
        if cfg.raw:
            flat = g.flatten(1)
            if flat.shape[1] > cfg.raw_max_dim:
                raise WatchError(
                    f"Module {name!r}: its logged block has {flat.shape[1]} entries, above "
                    f"statistics.raw_max_dim={cfg.raw_max_dim}; lower its ranks or disable raw."
                )
            stats.add(name, "raw", flat.T @ flat)
        stats.add(name, "examples", n_new)
    if cfg.raw_joint:  # the whole row's covariance (raw-joint preconditioner); dim checked in watch()
        rows = torch.cat([grads[name][keep].to(dtype).flatten(1) for name in state.names()], dim=1)
        stats.add(JOINT, "raw", rows.T @ rows)
        stats.add(JOINT, "examples", n_new)
