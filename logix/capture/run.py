"""The Run: owns the hooks, the passes, the statistics and the store of one logging run.

Typical use: ``run = logix.init("p", model=model)``, ``with run(data_id=ids):`` around each batch's
forward and ``loss.backward()`` (inside ``for pass_ in run.plan():`` when the config needs several
passes), then ``run.finalize()``. There is no global state: everything lives on the ``Run``
object, and hooks exist only inside ``with run(...)`` blocks.

Under ``torch.distributed`` (``torchrun``, ``accelerate launch``) every rank creates the same
run on a shared directory and logs its own part of the data: each rank writes its own shards,
statistics are summed over ranks at the end of each pass, rank 0 computes what derives from
them (eigenbases, PCA projections) and every rank reads it back. See docs/distributed.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from logix.capture.block import LogContext
from logix.capture.engine import Watched
from logix.capture.fingerprint import ModelGuard
from logix.capture.passes import (
    Pass,
    finish_pass,
    init_projections,
    load_finished_state,
    pending_specs,
    plan_specs,
    run_plan,
)
from logix.capture.ranks import projection_digest
from logix.capture.spec import PassName
from logix.capture.state import RunState
from logix.capture.watch import select_modules
from logix.config import Config, LossReduction, resolve_config
from logix.core.distributed import Dist, check_wrapping, unwrap_model
from logix.core.projection import ModuleProjection
from logix.core.statistics import Statistics
from logix.errors import PlanError, RunDirectoryError, WatchError
from logix.store import Layout, Store
from logix.store.format import read_manifest
from logix.store.guard import Lease, check_nested_name, check_project_name, open_directory
from logix.store.rundir import QUERY_STORE, TRAIN_STORE, store_dir
from logix.store.runinfo import RunInfo, normalise_ids
from logix.store.sink import committed_ids

log = logging.getLogger("logix")


class Run:
    """A logging run rooted at ``<config.root>/<project>``.

    Args:
        project: name of the run directory under ``config.root``.
        config: a :class:`Config`, a mapping, a YAML path, or None for defaults.
        root: overrides ``config.root``.
        overwrite: delete an existing run directory instead of resuming it.
        distributed: log as one rank of the initialised ``torch.distributed`` process group
            (default: whenever one is initialised); False logs as a single process.
        resume: add to an existing run directory whatever state of the model its rows were
            logged with (e.g. logging while training, restarted from a checkpoint). By default a
            directory is resumed only with the model state it was logged with: another state is
            an error at the first block, query or ``plan()`` (see :mod:`logix.capture.fingerprint`).
        model: watch it now (``run.watch(model)`` with the config's module filters).
    """

    def __init__(
        self,
        project: str,
        config: Config | dict | str | Path | None = None,
        root: str | Path | None = None,
        overwrite: bool = False,
        distributed: bool | None = None,
        resume: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        config = resolve_config(config)
        if root is not None:
            config = config.replace(root=str(root))
        self.project = check_nested_name(project)
        run_dir = Path(config.root) / project
        dist = Dist.current(distributed)
        self._lease: Lease | None = None

        def open_info() -> RunInfo:
            # one writing process per run directory; overwrite deletes only a logix run inside root
            self._lease = open_directory(run_dir, config.root, overwrite)
            return RunInfo.open_or_create(run_dir, config, plan_specs(config))

        info = dist.on_main(open_info)  # rank 0 writes run.json; the others get a copy
        info.writer = dist.is_main
        self._state = RunState(config, run_dir, dist, info, guard=ModelGuard(run_dir, dist, resume))
        if model is not None:
            self.watch(model)

    # ---- what the run is ------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self._state.config

    @property
    def dir(self) -> Path:
        return self._state.dir

    @property
    def dist(self) -> Dist:
        return self._state.dist

    @property
    def info(self) -> RunInfo:
        return self._state.info

    @property
    def watched(self) -> list[Watched]:
        return self._state.watched

    @property
    def model(self) -> nn.Module | None:
        """The model last given to :meth:`watch` (unwrapped), None before."""
        return self._state.guard.model

    @property
    def projections(self) -> dict[str, ModuleProjection]:
        return self._state.projections

    @property
    def layout(self) -> Layout | None:
        return self._state.layout

    @property
    def passes(self) -> list[str]:
        """Names of every pass this run's configuration needs, in order."""
        return [s.name.value for s in plan_specs(self.config)]

    @property
    def pending_passes(self) -> list[str]:
        return [s.name.value for s in pending_specs(self._state)]

    @property
    def finalized(self) -> bool:
        return self.info.finalized

    # ---- watch ------------------------------------------------------------------------
    def watch(
        self,
        model: nn.Module,
        modules: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
    ) -> list[str]:
        """Choose the modules to capture (filters default to ``config.capture``).

        The model is not modified: hooks are attached only inside ``with run(...)``.
        Calling ``watch`` again replaces the selection. Returns the captured names.
        DDP / ``torch.compile`` wrappers are looked through, and FSDP's wrapper segments are
        dropped from module names, so a wrapped model logs under the plain model's names.
        """
        check_wrapping(model)
        model = unwrap_model(model)
        cap = self.config.capture
        state = self._state
        state.guard.watch(model)
        state.watched = select_modules(
            model,
            modules=cap.modules if modules is None else tuple(modules),
            exclude=cap.exclude if exclude is None else tuple(exclude),
            kinds=cap.types if types is None else tuple(types),
            trainable_only=cap.trainable_only,
        )
        names = state.names()
        self.dist.check_same(self._module_record(), "the watched modules")
        self.dist.on_main(lambda: self.info.check_modules(self._module_record()))
        self.info.modules = self._module_record() if self.info.modules is None else self.info.modules
        init_projections(state)
        if self.dist.active:
            self.dist.check_same(projection_digest(names, state.projections), "the projection matrices")
        self._check_joint_dim()
        load_finished_state(state)
        if PassName.LOG not in self.info.done:  # ids an interrupted earlier session committed (resume skips them)
            state.committed, _ = committed_ids(store_dir(self.dir, TRAIN_STORE))
        log.info("logix: watching %d modules: %s", len(names), names)
        return names

    def _check_joint_dim(self) -> None:
        st = self.config.statistics
        dim = self.layout.dim
        if st.raw_joint and dim > st.raw_max_dim:
            raise WatchError(
                f"statistics.raw_joint: a logged row has {dim} entries, above statistics.raw_max_dim="
                f"{st.raw_max_dim}; its covariance would need {dim**2 * 8 / 2**20:,.0f} MB (float64) and "
                "its inverse as much again. Lower the ranks, raise raw_max_dim, or use the per-module "
                "raw covariance (statistics.raw) instead."
            )

    def _module_record(self) -> list[dict[str, Any]]:
        return [
            {"name": w.name, "kind": w.adapter.kind, "d_in": w.shape.d_in, "d_out": w.shape.d_out,
             "bias": w.shape.bias}
            for w in self.watched
        ]

    # ---- the plan and the blocks ----------------------------------------------------------
    def plan(self) -> Iterator[Pass]:
        """Yield each pass the configuration still needs; loop over your data in each.

        Passes already completed (by this process or, on resume, an earlier one) are
        skipped. Leaving the loop early leaves the current pass unfinished. A configuration of
        one pass (``run.passes == ["log"]``, e.g. the default) may log without it.

        Raises:
            RunDirectoryError: the directory was logged with another state of the model.
        """
        self._state.require_watch()
        self._state.guard.check()  # also when every pass is done: the run's rows must be this model's
        return run_plan(self._state)

    def __call__(self, data_id: Sequence | Tensor | None = None, mask: Tensor | None = None, *,
                 loss_reduction: LossReduction | str = LossReduction.SUM, loss_scale: float = 1.0) -> LogContext:
        """A block that captures one batch: run forward and ``loss.backward()`` inside it.

        Per-example gradients are those of each example's *summed* loss. A loss that is a mean
        works too when the block is told what it was divided by, so that the training loop's own
        loss can be kept: ``loss_reduction="mean"`` (a mean over the batch's examples, e.g.
        ``F.cross_entropy`` of a classifier) or ``loss_scale=N`` (e.g. a HF causal LM's ``.loss``,
        a mean over its ``N`` label tokens: ``N = (labels[:, 1:] != -100).sum()``).

        Args:
            data_id: one id (int or str) per example; required in the pass that stores rows.
            mask: ``(batch, seq_len)`` 0/1 tensor; padding tokens (0) contribute nothing.
            loss_reduction: ``sum`` (default) or ``mean`` over the batch's examples.
            loss_scale: what else the loss was divided by; captured gradients are multiplied by it.
        """
        return LogContext(self._state, data_id, mask, loss_reduction=loss_reduction, loss_scale=loss_scale)

    def pending(self, data_id: Sequence | Tensor) -> list:
        """The ids of ``data_id`` that this run has not stored yet (to skip done batches)."""
        ids, _ = normalise_ids(data_id)
        sinks = self._state.sinks
        if TRAIN_STORE in sinks:
            return sinks[TRAIN_STORE].pending(ids)
        if PassName.LOG in self.info.done:
            return []
        return [i for i in ids if i not in self._state.committed]

    def log_queries(self, data_id: Sequence | Tensor, mask: Tensor | None = None, *,
                    loss_reduction: LossReduction | str = LossReduction.SUM, loss_scale: float = 1.0) -> LogContext:
        """Like ``run(...)`` (same arguments), but rows go to the ``queries`` store, same projection.

        Use it after the training rows are logged (the run is finalized, in this process or
        an earlier one); statistics are not updated. Call ``run.finalize()`` (again) when
        done to commit the query rows.
        """
        return LogContext(self._state, data_id, mask, QUERY_STORE, loss_reduction, loss_scale)

    def capture(self, data_id: Sequence | Tensor, mask: Tensor | None = None, *,
                loss_reduction: LossReduction | str = LossReduction.SUM, loss_scale: float = 1.0) -> LogContext:
        """Like :meth:`log_queries`, but the rows stay in memory (``block.rows``, ``block.row_ids``
        after the block) and nothing is written: new examples scored against the stored rows
        (:func:`logix.score`) without a query store."""
        return LogContext(self._state, data_id, mask, None, loss_reduction, loss_scale)

    def check_model(self, model: nn.Module | None = None) -> None:
        """Refuse a model (default: the watched one) whose state differs from the one this
        directory's rows were logged with; recorded when there is none. Runs on its own before
        this session's first block or ``plan()``; raises :class:`RunDirectoryError`."""
        self._state.guard.check(model)

    # ---- ending -----------------------------------------------------------------------
    def finalize(self) -> Store:
        """Finish the log pass: commit buffered rows, save statistics, close the store.

        Raises:
            PlanError: passes of the plan did not run yet.
        """
        state = self._state
        if state.current is not None:
            if state.current.name is not PassName.LOG:
                raise PlanError(f"Pass {state.current.name.value!r} is unfinished; complete run.plan().")
            finish_pass(state)
        if self.pending_passes:
            raise PlanError(f"finalize() called before the passes {self.pending_passes} ran.")
        if not self.info.finalized:
            self.dist.on_main(self.info.mark_finalized)
            self.info.finalized = True
        state.guard.record()
        if any(self.dist.all_gather_object(QUERY_STORE in state.sinks)):  # some rank logged queries
            state.close_sink(QUERY_STORE)
        self.dist.barrier()
        return self.store()

    def close(self) -> None:
        """Commit what was logged so far without finishing the pass (resume later)."""
        sinks = self._state.sinks
        try:
            for sink in sinks.values():
                sink.close()
            self._state.guard.record()
        finally:
            sinks.clear()
            self._state.current = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.close()

    # ---- reading back -------------------------------------------------------------------
    def store(self, name: str = TRAIN_STORE) -> Store:
        """The committed rows of a store of this run."""
        return Store(store_dir(self.dir, name))

    @property
    def statistics(self) -> Statistics:
        """Log-space statistics (finalized after the log pass)."""
        if self._state.stats is None:
            raise PlanError("No statistics yet: run the plan first.")
        return self._state.stats

    @property
    def full_statistics(self) -> Statistics | None:
        """Full-space covariances from the PCA covariance pass, if one ran."""
        return self._state.full_stats

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, modules={len(self.watched)}, pending={self.pending_passes})"


def init(
    project: str,
    config: Config | dict | str | Path | None = None,
    root: str | Path | None = None,
    overwrite: bool = False,
    distributed: bool | None = None,
    resume: bool = False,
    model: nn.Module | None = None,
) -> Run:
    """Create or resume the run ``<root>/<project>``; see :class:`Run`.

    ``run = logix.init("proj", model=model)`` then ``with run(data_id=ids):`` around the forward /
    backward is the whole integration for a one-pass configuration (the default);
    ``run.finalize()`` after the loop commits it. The process holds the run directory's lock while
    the run lives (a second process is refused, naming this one's pid). Under an initialised
    ``torch.distributed`` group every rank must call it (the run is shared).

    Args:
        project: The run directory's name under ``root`` (a plain name: no separator or ``..``).
        config: A :class:`~logix.config.Config`, a mapping, a YAML path, or None for defaults.
        root: Overrides ``config.root`` (default ``logix_runs``).
        overwrite: Delete an existing logix run directory inside ``root`` and start afresh.
        distributed: Log as one rank of the initialised process group (default: whenever one is
            initialised); False makes a run of this process alone.
        resume: Resume a directory whatever model state its rows were logged with.
        model: Watch it now (``run.watch(model)`` with the config's module filters).

    Returns:
        The run.

    Raises:
        ConfigError: ``project`` is not a plain name, or the config is invalid.
        RunDirectoryError: The directory holds a run of another configuration, or another
            process holds its lock.
    """
    check_project_name(project)
    return Run(project, config=config, root=root, overwrite=overwrite, distributed=distributed,
               resume=resume, model=model)


def load_run_store(run_dir: str | Path, name: str = TRAIN_STORE) -> Store:
    """Open a store of a finished (or interrupted) run directory.

    Args:
        run_dir: The run directory.
        name: The store: ``train`` (the rows), ``queries`` (the logged queries), ...

    Returns:
        The store (:func:`load_store`).

    Raises:
        RunDirectoryError: The run has no store of that name.
    """
    path = store_dir(run_dir, name)
    if read_manifest(path) is None:
        raise RunDirectoryError(f"{run_dir} has no store named {name!r}.")
    return Store(path)
