"""The passes of a run: the plan, starting and finishing each pass, and the statistics and
projections each one saves (and a resumed run loads back)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logix.capture.corrections import ekfac_from_store
from logix.capture.ranks import adopt_orphan_states, reduce_statistics
from logix.capture.spec import PassName, PassSpec, Space
from logix.capture.state import RunState
from logix.config import Config, FisherType, ProjectionType, StoreDtype
from logix.core.projection import (
    ModuleProjection,
    load_projections,
    pca_projection,
    save_projections,
    seeded_projection,
    whitened_projection,
)
from logix.core.statistics import Statistics, eigendecompose
from logix.errors import PlanError
from logix.store import Layout, Store
from logix.store.rundir import TRAIN_STORE, projection_file, statistics_dir, statistics_file, store_dir

log = logging.getLogger("logix")


@dataclass(frozen=True)
class Pass:
    """One pass over the data that the run's plan needs, as ``run.plan()`` yields it.

    Attributes:
        name: What the pass computes (``covariance``, ``kfac``, ``fisher``, ``log``, ...).
        index: Its position in the plan, from 0.
        total: The number of passes of the plan.
        writes_rows: Whether the pass writes rows to the train store.
        sample_labels: Compute this pass's loss with labels sampled from the model, not the data
            (true Fisher).
        repeats: Loop over the data this many times in this pass (fresh label draws each).
        expected: ``statistics.fisher: expected``: repeat ``r`` uses class ``r``, weighted by
            ``sqrt(C p_r)``.
    """

    name: PassName
    index: int
    total: int
    writes_rows: bool
    sample_labels: bool = False  # compute this pass's loss with labels from the model, not the data
    repeats: int = 1  # loop over the data this many times in this pass (fresh label draws each)
    expected: bool = False  # fisher: expected: repeat r uses class r, weighted by sqrt(C p_r)

    def __str__(self) -> str:
        return f"pass {self.index + 1}/{self.total}: {self.name}"

    def loss_kwargs(self, repeat: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`logix.integrations.summed_loss` for repeat ``repeat``.

        ``{}`` in a pass that uses the data's labels; ``sample_labels`` and ``generator`` in a
        true-Fisher pass; ``label_class=repeat`` and ``num_classes`` in an expected-Fisher pass.
        """
        if self.expected:
            return {"label_class": repeat, "num_classes": self.repeats}
        if self.sample_labels:
            return {"sample_labels": True, "generator": generator}
        return {}


# ---- the plan ---------------------------------------------------------------------------------
def plan_specs(config: Config) -> list[PassSpec]:
    """The passes ``config`` needs, in order."""
    per_token = config.capture.per_token
    st = config.statistics
    raw = st.raw or st.raw_joint
    true_fisher = st.fisher is not FisherType.EMPIRICAL and (st.kfac or st.ekfac or raw)
    pca = config.projection.type.needs_covariance
    # EK-FAC of the data's labels on per-example rows: A and S in the log pass, then the
    # corrections from the stored rows in their eigenbasis (the same sums, no pass before)
    # (rows of at least 8 bits: int4's rounding noise would bias the small corrections upwards)
    from_rows = (st.ekfac and not true_fisher and not pca and not per_token
                 and config.store.dtype is not StoreDtype.INT4)
    specs = []
    if pca:
        specs.append(PassSpec(PassName.COVARIANCE, Space.FULL, covariance=True, gradients=False,
                              sample_labels=true_fisher))
    if not pca and ((st.ekfac and not from_rows) or (true_fisher and st.kfac)):
        specs.append(PassSpec(PassName.KFAC, Space.LOG, covariance=True, gradients=False,
                              sample_labels=true_fisher))
    if true_fisher and (st.ekfac or raw):
        specs.append(PassSpec(PassName.FISHER, Space.LOG, covariance=False, gradients=True, rows=False,
                              sample_labels=True))
    log_cov = (st.kfac and not st.ekfac and not true_fisher) or from_rows
    fisher_pass = true_fisher and (st.ekfac or raw)  # counts the examples and their gradient statistics
    specs.append(PassSpec(PassName.LOG, Space.LOG, covariance=log_cov, gradients=True, per_token=per_token,
                          gradient_stats=not fisher_pass, ekfac_from_rows=from_rows))
    return specs


def query_spec(config: Config) -> PassSpec:
    """The pass of ``run.log_queries``: rows of the queries store, in the run's projection."""
    return PassSpec(PassName.QUERIES, Space.LOG, covariance=False, gradients=True,
                    per_token=config.capture.per_token)


def pending_specs(state: RunState) -> list[PassSpec]:
    return [s for s in plan_specs(state.config) if s.name not in state.info.done]


def run_plan(state: RunState) -> Iterator[Pass]:
    """Start each pass not done yet, yield it, and finish it when the caller's loop is over."""
    state.require_watch()
    specs = plan_specs(state.config)
    for index, spec in enumerate(specs):
        if spec.name in state.info.done:
            continue
        start_pass(state, spec)
        st = state.config.statistics
        expected = spec.sample_labels and st.fisher is FisherType.EXPECTED
        repeats = (st.fisher_classes if expected else st.fisher_samples) if spec.sample_labels else 1
        yield Pass(spec.name, index, len(specs), spec.rows and spec.gradients, spec.sample_labels, repeats,
                   expected)
        finish_pass(state)


def active_spec(state: RunState) -> PassSpec:
    """The pass a training block logs in: the running one, or the log pass when it is all that
    is left (a run whose plan is that one pass may log without ``run.plan()``)."""
    state.require_watch()
    if state.info.finalized:
        raise PlanError(
            f"Run {state.dir} is finalized. Read it with run.store(), or start a new project "
            "(or pass overwrite=True) to log again."
        )
    if state.current is None:
        pending = [s.name.value for s in pending_specs(state)]
        if pending != [PassName.LOG]:
            raise PlanError(
                f"This configuration needs the passes {pending}; loop over your data inside "
                "`for pass_ in run.plan():`."
            )
        start_pass(state, plan_specs(state.config)[-1])
    return state.current


# ---- starting a pass ----------------------------------------------------------------------------
def start_pass(state: RunState, spec: PassSpec) -> None:
    if state.current is not None:
        if state.current.name is spec.name:
            return
        raise PlanError(f"Pass {state.current.name.value!r} is still running.")
    log.info("logix: starting pass %r", spec.name.value)
    state.current = spec
    state.base = None
    if spec.space is Space.FULL:
        state.full_stats = Statistics(state.accum_dtype)
    elif spec.name is PassName.KFAC:
        state.stats = Statistics(state.accum_dtype)
    elif spec.name is PassName.FISHER:  # continues the kfac pass's statistics (A, S, eigenbases)
        state.base = state.stats.flat() if state.stats else None
        state.stats = Statistics.from_flat(state.stats.flat()) if state.stats else Statistics(state.accum_dtype)
    else:
        state.base = state.stats.flat() if state.stats else None
        _open_log_pass(state)


def _open_log_pass(state: RunState) -> None:
    sink = state.open_sink(TRAIN_STORE, state=lambda: state.stats.flat())
    if state.config.projection.type is not ProjectionType.NONE and state.dist.is_main:
        save_projections(projection_file(state.dir), state.projections)  # same on every rank
    if sink.state_file is not None:
        state.stats = Statistics.load(sink.state_file, frozen=False)
        log.info("logix: resuming after %d committed rows", sink.writer.committed_rows)
    elif state.stats is not None:  # A, S and eigenbases from the kfac pass
        state.stats = Statistics.from_flat(state.stats.flat())
    else:
        state.stats = Statistics(state.accum_dtype)
    if state.dist.is_main:
        state.stats = adopt_orphan_states(state.dist, store_dir(state.dir, TRAIN_STORE), state.stats, state.base)


# ---- finishing a pass ---------------------------------------------------------------------------
def finish_pass(state: RunState) -> None:
    spec = state.current
    if spec is None:
        return
    if spec.name is PassName.LOG:
        state.close_sink(TRAIN_STORE)
    if state.dist.active:  # sum every rank's statistics of this pass
        if spec.space is Space.FULL:
            state.full_stats = reduce_statistics(state.dist, state.full_stats, None, state.accum_dtype)
        else:
            state.stats = reduce_statistics(state.dist, state.stats, state.base, state.accum_dtype)
    if spec.ekfac_from_rows:  # every rank reads its own rows; the sums are all-reduced
        _check_stats(state.stats, PassName.LOG)
        ekfac_from_store(state.stats, Store(store_dir(state.dir, TRAIN_STORE)), state.names(), state.dist,
                         state.accum_dtype)
    state.dist.on_main(lambda: _finish_files(state, spec))
    if not state.dist.is_main:  # read back what rank 0 derived (eigenbases, PCA projections)
        _read_finished(state, spec)
    state.current = None
    state.base = None
    if spec.name not in state.info.done:
        state.info.done.append(spec.name.value)
    log.info("logix: finished pass %r", spec.name.value)


def _stats_file(state: RunState, name: PassName) -> Path:
    """The statistics file of a pass: the covariance pass saves the full-space ones."""
    return statistics_file(state.dir, Space.FULL if name is PassName.COVARIANCE else name)


def _finish_files(state: RunState, spec: PassSpec) -> None:
    """The end of a pass on one process (rank 0 of a distributed run): checks, derived
    statistics and projections, files, and the pass marked done in ``run.json``."""
    statistics_dir(state.dir).mkdir(parents=True, exist_ok=True)
    if spec.name is PassName.COVARIANCE:
        _finish_covariance(state)
    elif spec.name is PassName.KFAC:
        _check_stats(state.stats, spec.name)
        eigendecompose(state.stats, state.names())
        state.stats.freeze()
        state.stats.save(_stats_file(state, PassName.KFAC))
    elif spec.name is PassName.FISHER:
        _check_stats(state.stats, spec.name)
        state.stats.freeze()
        state.stats.save(_stats_file(state, PassName.FISHER))
    else:
        st = state.config.statistics
        if st.raw or st.raw_joint or st.kfac or st.ekfac:
            _check_stats(state.stats, PassName.LOG)
        state.stats.freeze()
        state.stats.save(_stats_file(state, PassName.LOG))
    state.info.mark_done(spec.name.value)


def _read_finished(state: RunState, spec: PassSpec) -> None:
    if spec.name is PassName.COVARIANCE:
        state.full_stats = Statistics.load(_stats_file(state, PassName.COVARIANCE))
        state.projections = load_projections(projection_file(state.dir), state.names())
        if state.config.statistics.ekfac:
            state.stats = Statistics.load(_stats_file(state, PassName.KFAC))
    else:
        state.stats = Statistics.load(_stats_file(state, spec.name))


def _check_stats(stats: Statistics | None, name: PassName) -> None:
    if stats is None or not stats.modules:
        raise PlanError(
            f"Pass {name.value!r} saw no data: run your data loop inside `for pass_ in run.plan()`."
        )


def _finish_covariance(state: RunState) -> None:
    full = state.full_stats
    _check_stats(full, PassName.COVARIANCE)
    full.freeze()
    full.save(_stats_file(state, PassName.COVARIANCE))
    pcfg = state.config.projection
    for w in state.watched:
        k_in, k_out = state.ranks(w)
        if pcfg.type is ProjectionType.WHITENED:
            state.projections[w.name] = ModuleProjection(
                whitened_projection(w.name, full.mean(w.name, "A"), k_in, pcfg.seed, "input",
                                    pcfg.whiten_damping),
                whitened_projection(w.name, full.mean(w.name, "S"), k_out, pcfg.seed, "output-gradient",
                                    pcfg.whiten_damping),
            )
            continue
        state.projections[w.name] = ModuleProjection(
            pca_projection(w.name, full.mean(w.name, "A"), k_in, "input"),
            pca_projection(w.name, full.mean(w.name, "S"), k_out, "output-gradient"),
        )
    save_projections(projection_file(state.dir), state.projections)
    if state.config.statistics.ekfac:
        state.stats = _project_full_stats(state, full)
        eigendecompose(state.stats, state.names())
        state.stats.freeze()
        state.stats.save(_stats_file(state, PassName.KFAC))


def _project_full_stats(state: RunState, full: Statistics) -> Statistics:
    """``P^T A P`` and ``P^T S P``: the log-space factors of the covariance pass's data."""
    stats = Statistics(state.accum_dtype)
    for name in state.names():
        proj = state.projections[name]
        for key, p in (("A", proj.p_in), ("S", proj.p_out)):
            p64 = p.to(torch.float64)
            stats.set(name, key, p64.T @ full.raw_sum(name, key).to(torch.float64) @ p64)
        stats.set(name, "tokens", full.raw_sum(name, "tokens"))
    return stats


# ---- a resumed run ------------------------------------------------------------------------------
def load_finished_projections(state: RunState) -> None:
    """The projections a finished covariance pass derived (PCA / whitened runs)."""
    if state.config.projection.type.needs_covariance and PassName.COVARIANCE in state.info.done:
        state.projections = load_projections(projection_file(state.dir), state.names())


def load_finished_state(state: RunState) -> None:
    """The statistics of the passes an earlier session finished (or the kfac pass saved)."""
    done = state.info.done
    if PassName.COVARIANCE in done:
        state.full_stats = Statistics.load(_stats_file(state, PassName.COVARIANCE))
    if PassName.LOG in done:
        state.stats = Statistics.load(_stats_file(state, PassName.LOG))
    elif PassName.FISHER in done:
        state.stats = Statistics.load(_stats_file(state, PassName.FISHER))
    elif _stats_file(state, PassName.KFAC).exists():
        state.stats = Statistics.load(_stats_file(state, PassName.KFAC))


def init_projections(state: RunState) -> None:
    """Each watched module's projection (random ones drawn here, PCA / whitened ones read back
    once their pass finished) and the row layout they give."""
    ptype = state.config.projection.type
    seed = state.config.projection.seed
    state.projections = {}
    for w in state.watched:
        if ptype is ProjectionType.NONE:
            state.projections[w.name] = ModuleProjection(None, None)
        elif ptype.is_seeded:
            k_in, k_out = state.ranks(w)
            state.projections[w.name] = ModuleProjection(
                seeded_projection(ptype, w.name, w.shape.d_in_aug, k_in, seed, "in"),
                seeded_projection(ptype, w.name, w.shape.d_out, k_out, seed, "out"),
            )
    load_finished_projections(state)
    entries = []
    for w in state.watched:
        if ptype is ProjectionType.NONE:
            shape = (w.shape.d_out, w.shape.d_in_aug)
        else:
            k_in, k_out = state.ranks(w)
            shape = (k_out, k_in)
        entries.append((w.name, w.adapter.kind, shape))
    state.layout = Layout.build(entries)
