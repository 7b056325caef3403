"""The Run: owns the hooks, the passes, the statistics and the store of one logging run.

Typical use::

    run = logix.init("my_project", config="configs/logix.yaml")
    run.watch(model)
    for pass_ in run.plan():            # 1 pass, or 2 for PCA init / EK-FAC
        for batch in loader:
            with run(data_id=batch["id"], mask=batch["attention_mask"]):
                loss = per_example_summed_loss(model, batch)
                loss.backward()
    run.finalize()

There is no global state: everything lives on the ``Run`` object, and hooks exist
only inside ``with run(...)`` blocks.

Under ``torch.distributed`` (``torchrun``, ``accelerate launch``) every rank creates the same
run on a shared directory and logs its own part of the data: each rank writes its own shards,
statistics are summed over ranks at the end of each pass, rank 0 computes what derives from
them (eigenbases, PCA projections) and every rank reads it back. See docs/distributed.md.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logix.capture.engine import BatchCapture, BatchResult, PassSpec, Watched
from logix.capture.watch import select_modules
from logix.config import Config, DuplicatePolicy, FisherType, ProjectionType, resolve_config
from logix.core.distributed import Dist, check_wrapping, unwrap_model
from logix.core.projection import (
    ModuleProjection,
    load_projections,
    pca_projection,
    random_projection,
    save_projections,
    whitened_projection,
)
from logix.core.statistics import JOINT, Statistics, eigendecompose
from logix.errors import BatchError, DuplicateIdError, PlanError, RunDirectoryError, WatchError
from logix.store import Layout, Store
from logix.store.format import manifest_ranks, read_manifest, read_rank_manifest, row_dtype
from logix.store.quant import is_quantized
from logix.store.runinfo import RunInfo, normalise_ids
from logix.store.sink import StoreSink, committed_ids
from logix.store.writer import drop_rows

log = logging.getLogger("logix")

TRAIN_STORE = "train"
QUERY_STORE = "queries"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Pass:
    """One pass over the data that the run's plan needs."""

    name: str
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


class Run:
    """A logging run rooted at ``<config.root>/<project>``.

    Args:
        project: name of the run directory under ``config.root``.
        config: a :class:`Config`, a mapping, a YAML path, or None for defaults.
        root: overrides ``config.root``.
        overwrite: delete an existing run directory instead of resuming it.
        distributed: log as one rank of the initialised ``torch.distributed`` process group
            (default: whenever one is initialised); False logs as a single process.
    """

    def __init__(
        self,
        project: str,
        config: Config | dict | str | Path | None = None,
        root: str | Path | None = None,
        overwrite: bool = False,
        distributed: bool | None = None,
    ) -> None:
        self.config = resolve_config(config)
        if root is not None:
            self.config = self.config.replace(root=str(root))
        self.project = project
        self.dir = Path(self.config.root) / project
        self.dist = Dist.current(distributed)

        def open_info() -> RunInfo:
            if overwrite and self.dir.exists():
                shutil.rmtree(self.dir)
            return RunInfo.open_or_create(self.dir, self.config, self._pass_specs())

        self.info = self.dist.on_main(open_info)  # rank 0 writes run.json; the others get a copy
        self.info.writer = self.dist.is_main
        self.watched: list[Watched] = []
        self.projections: dict[str, ModuleProjection] = {}
        self.layout: Layout | None = None
        self._stats: Statistics | None = None
        self._full_stats: Statistics | None = None
        self._current: PassSpec | None = None
        self._sinks: dict[str, StoreSink] = {}  # stores being written: train, queries
        self._committed: set = set()  # train ids an interrupted session committed (resume)
        self._compute_dtype = _DTYPES[self.config.capture.compute_dtype.value]
        self._pass_base: dict[str, Tensor] | None = None  # stats carried into the pass (not reduced again)

    # ---- passes -----------------------------------------------------------------------
    def _pass_specs(self) -> list[PassSpec]:
        cfg = self.config
        per_token = cfg.capture.per_token
        st = cfg.statistics
        raw = st.raw or st.raw_joint
        true_fisher = st.fisher is not FisherType.EMPIRICAL and (st.kfac or st.ekfac or raw)
        pca = cfg.projection.type.needs_covariance
        specs = []
        if pca:
            specs.append(PassSpec("covariance", "full", covariance=True, gradients=False,
                                  sample_labels=true_fisher))
        if not pca and (st.ekfac or (true_fisher and st.kfac)):
            specs.append(PassSpec("kfac", "log", covariance=True, gradients=False, sample_labels=true_fisher))
        if true_fisher and (st.ekfac or raw):
            specs.append(PassSpec("fisher", "log", covariance=False, gradients=True, rows=False,
                                  sample_labels=True))
        log_cov = st.kfac and not st.ekfac and not true_fisher
        specs.append(PassSpec("log", "log", covariance=log_cov, gradients=True, per_token=per_token,
                              gradient_stats=not true_fisher))
        return specs

    @property
    def passes(self) -> list[str]:
        """Names of every pass this run's configuration needs, in order."""
        return [s.name for s in self._pass_specs()]

    @property
    def pending_passes(self) -> list[str]:
        return [s.name for s in self._pass_specs() if s.name not in self.info.done]

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
        self.watched = select_modules(
            model,
            modules=cap.modules if modules is None else tuple(modules),
            exclude=cap.exclude if exclude is None else tuple(exclude),
            kinds=cap.types if types is None else tuple(types),
            trainable_only=cap.trainable_only,
        )
        names = [w.name for w in self.watched]
        self.dist.check_same(self._module_record(), "the watched modules")
        self.dist.on_main(lambda: self.info.check_modules(self._module_record()))
        self.info.modules = self._module_record() if self.info.modules is None else self.info.modules
        self._init_projections()
        if self.dist.active:
            self.dist.check_same(self._projection_digest(), "the projection matrices")
        self._check_joint_dim()
        self._load_finished_state()
        self._load_committed_ids()
        log.info("logix: watching %d modules: %s", len(names), names)
        return names

    def _projection_digest(self) -> list:
        """A cheap fingerprint of the projections (equal on every rank of a distributed run)."""
        out = []
        for name in self._names():
            proj = self.projections.get(name)  # none yet before a PCA run's covariance pass
            for p in () if proj is None else (proj.p_in, proj.p_out):
                out.append(None if p is None else (tuple(p.shape), round(float(p.double().sum()), 6),
                                                   round(float(p.double().abs().sum()), 6)))
        return out

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

    def _init_projections(self) -> None:
        ptype = self.config.projection.type
        seed = self.config.projection.seed
        self.projections = {}
        for w in self.watched:
            if ptype is ProjectionType.NONE:
                self.projections[w.name] = ModuleProjection(None, None)
            elif ptype is ProjectionType.RANDOM:
                k_in, k_out = self._ranks(w)
                self.projections[w.name] = ModuleProjection(
                    random_projection(w.name, w.shape.d_in_aug, k_in, seed, "in"),
                    random_projection(w.name, w.shape.d_out, k_out, seed, "out"),
                )
        if ptype.needs_covariance and "covariance" in self.info.done:
            self.projections = load_projections(self.dir / "projection.safetensors", self._names())
        self._set_layout()

    def _set_layout(self) -> None:
        entries = []
        for w in self.watched:
            if self.config.projection.type is ProjectionType.NONE:
                shape = (w.shape.d_out, w.shape.d_in_aug)
            else:
                k_in, k_out = self._ranks(w)
                shape = (k_out, k_in)
            entries.append((w.name, w.adapter.kind, shape))
        self.layout = Layout.build(entries)

    def _ranks(self, w: Watched) -> tuple[int, int]:
        """``(k_in, k_out)`` of a module: the configured ranks, capped at the module's own
        dimensions (projecting to more dimensions than a side has adds bytes, not information)."""
        k_in, k_out = self.config.rank_for(w.name)
        return min(k_in, w.shape.d_in_aug), min(k_out, w.shape.d_out)

    def _names(self) -> list[str]:
        return [w.name for w in self.watched]

    def _load_finished_state(self) -> None:
        stats_dir = self.dir / "statistics"
        if "covariance" in self.info.done:
            self._full_stats = Statistics.load(stats_dir / "full.safetensors")
        if "log" in self.info.done:
            self._stats = Statistics.load(stats_dir / "log.safetensors")
        elif "fisher" in self.info.done:
            self._stats = Statistics.load(stats_dir / "fisher.safetensors")
        elif (stats_dir / "kfac.safetensors").exists():
            self._stats = Statistics.load(stats_dir / "kfac.safetensors")

    def _load_committed_ids(self) -> None:
        """Ids an interrupted earlier session committed (resume skips them)."""
        if "log" not in self.info.done:
            self._committed, _ = committed_ids(self.dir / "stores" / TRAIN_STORE)

    def _require_watch(self) -> None:
        if not self.watched:
            raise WatchError("Call run.watch(model) before logging.")

    # ---- the plan ---------------------------------------------------------------------
    def plan(self) -> Iterator[Pass]:
        """Yield each pass the configuration still needs; loop over your data in each.

        Passes already completed (by this process or, on resume, an earlier one) are
        skipped. Leaving the loop early leaves the current pass unfinished.
        """
        self._require_watch()
        specs = self._pass_specs()
        for index, spec in enumerate(specs):
            if spec.name in self.info.done:
                continue
            self._start_pass(spec)
            st = self.config.statistics
            expected = spec.sample_labels and st.fisher is FisherType.EXPECTED
            repeats = (st.fisher_classes if expected else st.fisher_samples) if spec.sample_labels else 1
            yield Pass(spec.name, index, len(specs), spec.rows and spec.gradients, spec.sample_labels, repeats,
                       expected)
            self._finish_pass()

    def _start_pass(self, spec: PassSpec) -> None:
        if self._current is not None:
            if self._current.name == spec.name:
                return
            raise PlanError(f"Pass {self._current.name!r} is still running.")
        log.info("logix: starting pass %r", spec.name)
        self._current = spec
        self._pass_base = None
        if spec.space == "full":
            self._full_stats = Statistics(self._accum_dtype())
        elif spec.name == "kfac":
            self._stats = Statistics(self._accum_dtype())
        elif spec.name == "fisher":  # continues the kfac pass's statistics (A, S, eigenbases)
            self._pass_base = self._stats.flat() if self._stats else None
            self._stats = Statistics.from_flat(self._stats.flat()) if self._stats else Statistics(
                self._accum_dtype())
        else:
            self._pass_base = self._stats.flat() if self._stats else None
            self._open_log_pass()

    def _accum_dtype(self) -> torch.dtype:
        return _DTYPES[self.config.statistics.dtype.value]

    def _open_sink(self, name: str, state=None) -> StoreSink:
        cfg = self.config
        dtype = cfg.store.dtype.value
        if name == QUERY_STORE and is_quantized(dtype):
            dtype = "float32"  # a few rows, scored against every train row: kept exact
        sink = StoreSink(
            self.dir / "stores" / name, self.layout, dtype, cfg.capture.per_token,
            cfg.store.shard_rows, cfg.store.queue_shards, cfg.store.duplicate_ids, state, self.dist.rank,
        )
        self._sinks[name] = sink
        return sink

    def _open_log_pass(self) -> None:
        sink = self._open_sink(TRAIN_STORE, state=lambda: self._stats.flat())
        if self.config.projection.type is not ProjectionType.NONE and self.dist.is_main:
            save_projections(self.dir / "projection.safetensors", self.projections)  # same on every rank
        if sink.state_file is not None:
            self._stats = Statistics.load(sink.state_file, frozen=False)
            log.info("logix: resuming after %d committed rows", sink.writer.committed_rows)
        elif self._stats is not None:  # A, S and eigenbases from the kfac pass
            self._stats = Statistics.from_flat(self._stats.flat())
        else:
            self._stats = Statistics(self._accum_dtype())
        if self.dist.is_main:
            self._adopt_orphan_states()

    def _adopt_orphan_states(self) -> None:
        """Fold in the running statistics of ranks that an earlier, larger distributed session
        had and this one lacks, so the statistics still describe every committed row."""
        directory = self.dir / "stores" / TRAIN_STORE
        base = self._pass_base or {}
        for rank in manifest_ranks(directory):
            if rank < self.dist.world_size:
                continue
            manifest = read_rank_manifest(directory, rank)
            if not manifest or not manifest.get("state"):
                continue
            orphan = Statistics.load(directory / manifest["state"]).flat()
            delta = {k: v - base[k] if k in base else v for k, v in orphan.items()}
            log.info("logix: adopting the statistics of rank %d of an earlier session", rank)
            self._stats = Statistics.from_flat(_add_flat(self._stats.flat(), delta))

    def _finish_pass(self) -> None:
        spec = self._current
        if spec is None:
            return
        stats_dir = self.dir / "statistics"
        if spec.name == "log":
            self._close_sink(TRAIN_STORE)
        if self.dist.active:  # sum every rank's statistics of this pass
            if spec.space == "full":
                self._full_stats = self._reduced(self._full_stats, None)
            else:
                self._stats = self._reduced(self._stats, self._pass_base)
        self.dist.on_main(lambda: self._finish_files(spec, stats_dir))
        if not self.dist.is_main:  # read back what rank 0 derived (eigenbases, PCA projections)
            self._read_finished(spec, stats_dir)
        self._current = None
        self._pass_base = None
        if spec.name not in self.info.done:
            self.info.done.append(spec.name)
        log.info("logix: finished pass %r", spec.name)

    def _finish_files(self, spec: PassSpec, stats_dir: Path) -> None:
        """The end of a pass on one process (rank 0 of a distributed run): checks, derived
        statistics and projections, files, and the pass marked done in ``run.json``."""
        stats_dir.mkdir(parents=True, exist_ok=True)
        if spec.name == "covariance":
            self._finish_covariance(stats_dir)
        elif spec.name == "kfac":
            self._check_stats(self._stats, "kfac")
            eigendecompose(self._stats, self._names())
            self._stats.freeze()
            self._stats.save(stats_dir / "kfac.safetensors")
        elif spec.name == "fisher":
            self._check_stats(self._stats, "fisher")
            self._stats.freeze()
            self._stats.save(stats_dir / "fisher.safetensors")
        else:
            self._finish_log(stats_dir)
        self.info.mark_done(spec.name)

    def _read_finished(self, spec: PassSpec, stats_dir: Path) -> None:
        if spec.name == "covariance":
            self._full_stats = Statistics.load(stats_dir / "full.safetensors")
            self.projections = load_projections(self.dir / "projection.safetensors", self._names())
            if self.config.statistics.ekfac:
                self._stats = Statistics.load(stats_dir / "kfac.safetensors")
        else:
            self._stats = Statistics.load(stats_dir / f"{spec.name}.safetensors")

    def _reduced(self, stats: Statistics | None, base: dict[str, Tensor] | None) -> Statistics:
        """``base`` plus the sum over ranks of what each rank added to it in this pass.

        ``base`` (the statistics carried into the pass, equal on every rank) is not summed
        again; keys no rank changed keep their exact values. Ranks that saw no data take part
        with zeros."""
        base = base or {}
        local = stats.flat() if stats is not None else {}
        meta = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), k not in base or not torch.equal(v, base[k]))
                for k, v in local.items()}
        merged: dict[str, tuple] = {}
        for rank_meta in self.dist.all_gather_object(meta):
            for k, (shape, dtype, changed) in rank_meta.items():
                old = merged.get(k)
                merged[k] = (shape, dtype, changed or (old is not None and old[2]))
        out = {k: v.clone() for k, v in base.items()}
        by_dtype: dict[str, list[str]] = {}
        for k in sorted(merged):
            if merged[k][2]:
                by_dtype.setdefault(merged[k][1], []).append(k)
        for dtype_name, keys in by_dtype.items():
            dtype = getattr(torch, dtype_name)
            parts = []
            for k in keys:
                shape = merged[k][0]
                if k in local:
                    v = local[k].to(dtype)
                    parts.append((v - base[k].to(dtype) if k in base else v).reshape(-1))
                else:
                    parts.append(torch.zeros(int(np.prod(shape)), dtype=dtype))
            total = self.dist.all_reduce_sum(torch.cat(parts))
            at = 0
            for k in keys:
                shape = merged[k][0]
                n = int(np.prod(shape))  # 1 for a scalar (shape ())
                delta = total[at : at + n].reshape(shape)
                at += n
                out[k] = base[k] + delta if k in base else delta
        return Statistics.from_flat(out) if out else Statistics(self._accum_dtype())

    def _check_stats(self, stats: Statistics | None, name: str) -> None:
        if stats is None or not stats.modules:
            raise PlanError(
                f"Pass {name!r} saw no data: run your data loop inside `for pass_ in run.plan()`."
            )

    def _finish_covariance(self, stats_dir: Path) -> None:
        full = self._full_stats
        self._check_stats(full, "covariance")
        full.freeze()
        full.save(stats_dir / "full.safetensors")
        pcfg = self.config.projection
        for w in self.watched:
            k_in, k_out = self._ranks(w)
            if pcfg.type is ProjectionType.WHITENED:
                self.projections[w.name] = ModuleProjection(
                    whitened_projection(w.name, full.mean(w.name, "A"), k_in, pcfg.seed, "input",
                                        pcfg.whiten_damping),
                    whitened_projection(w.name, full.mean(w.name, "S"), k_out, pcfg.seed, "output-gradient",
                                        pcfg.whiten_damping),
                )
                continue
            self.projections[w.name] = ModuleProjection(
                pca_projection(w.name, full.mean(w.name, "A"), k_in, "input"),
                pca_projection(w.name, full.mean(w.name, "S"), k_out, "output-gradient"),
            )
        save_projections(self.dir / "projection.safetensors", self.projections)
        if self.config.statistics.ekfac:
            self._stats = self._project_full_stats(full)
            eigendecompose(self._stats, self._names())
            self._stats.freeze()
            self._stats.save(stats_dir / "kfac.safetensors")

    def _project_full_stats(self, full: Statistics) -> Statistics:
        """``P^T A P`` and ``P^T S P``: the log-space factors of the covariance pass's data."""
        stats = Statistics(self._accum_dtype())
        for name in self._names():
            proj = self.projections[name]
            for key, p in (("A", proj.p_in), ("S", proj.p_out)):
                p64 = p.to(torch.float64)
                stats.set(name, key, p64.T @ full.raw_sum(name, key).to(torch.float64) @ p64)
            stats.set(name, "tokens", full.raw_sum(name, "tokens"))
        return stats

    def _close_sink(self, name: str) -> None:
        """Commit every rank's rows of the store ``name`` (collective; a rank without the store
        open takes part all the same), then check ids across ranks."""
        sink = self._sinks.pop(name, None)
        error = None
        try:
            if sink is not None:
                sink.close()
        except BaseException as exc:  # every rank must learn of it before the next collective
            error = exc
        self.dist.raise_anywhere(error)
        if sink is not None and sink.skipped_duplicates:
            log.warning("logix: skipped %d duplicate ids", sink.skipped_duplicates)
        self._check_rank_duplicates(name)

    def _check_rank_duplicates(self, store: str) -> None:
        """Ids committed by more than one rank: an error, or (``store.duplicate_ids: skip``)
        each rank but the lowest drops its copy from its own shards."""
        if not self.dist.active:
            return
        self.dist.barrier()  # every rank's shards are committed
        directory = self.dir / "stores" / store

        def find() -> dict[int, list]:
            if read_manifest(directory) is None:
                return {}
            owners: dict[object, int] = {}
            drop: dict[int, set] = {}
            st = Store(directory)
            rank_of_row = np.repeat([sh.get("rank", 0) for sh in st.manifest["shards"]], st.shard_rows)
            for key, rank in zip(st.ids, rank_of_row.tolist()):
                owner = owners.setdefault(key, rank)
                if owner != rank:
                    drop.setdefault(rank, set()).add(key)
            drop = {r: sorted(v, key=str) for r, v in drop.items()}
            if drop and self.config.store.duplicate_ids is DuplicatePolicy.ERROR:
                examples = [k for ks in drop.values() for k in ks][:5]
                n = sum(len(v) for v in drop.values())
                raise DuplicateIdError(
                    f"{n} ids of the {store} store were logged by more than one rank (e.g. {examples}); "
                    "the rows stay committed. A DistributedSampler repeats examples to give every rank "
                    "as many: split the data with logix.core.distributed.shard_indices (as extract() and the "
                    "Trainer callback do) or drop_last=True, or set store.duplicate_ids=skip to keep the "
                    "lowest rank's row."
                )
            return drop

        drop = self.dist.on_main(find)
        mine = drop.get(self.dist.rank, [])
        if mine:
            per_token = read_manifest(directory)["per_token"]
            drop_rows(directory, self.dist.rank, set(mine), per_token)
            log.warning(
                "logix: rank %d dropped %d rows whose ids another rank also logged (store.duplicate_ids=skip); "
                "the statistics of this pass include those examples once per rank that logged them",
                self.dist.rank, len(mine),
            )
        self.dist.barrier()

    def _finish_log(self, stats_dir: Path) -> None:
        st = self.config.statistics
        if st.raw or st.raw_joint or st.kfac or st.ekfac:
            self._check_stats(self._stats, "log")
        self._stats.freeze()
        self._stats.save(stats_dir / "log.safetensors")

    # ---- logging a batch ----------------------------------------------------------------
    def __call__(self, data_id: Sequence | Tensor | None = None, mask: Tensor | None = None) -> LogContext:
        """A block that captures one batch: run forward and ``loss.backward()`` inside it.

        Args:
            data_id: one id (int or str) per example; required in the pass that stores rows.
            mask: ``(batch, seq_len)`` 0/1 tensor; padding tokens (0) contribute nothing.
        """
        return LogContext(self, data_id, mask)

    def pending(self, data_id: Sequence | Tensor) -> list:
        """The ids of ``data_id`` that this run has not stored yet (to skip done batches)."""
        ids, _ = normalise_ids(data_id)
        if TRAIN_STORE in self._sinks:
            return self._sinks[TRAIN_STORE].pending(ids)
        if "log" in self.info.done:
            return []
        return [i for i in ids if i not in self._committed]

    def log_queries(self, data_id: Sequence | Tensor, mask: Tensor | None = None) -> LogContext:
        """Like ``run(...)``, but rows go to the ``queries`` store with the same projection.

        Use it after the training rows are logged (the run is finalized, in this process or
        an earlier one); statistics are not updated. Call ``run.finalize()`` (again) when
        done to commit the query rows.
        """
        return LogContext(self, data_id, mask, store=QUERY_STORE)

    def _active_spec(self) -> PassSpec:
        self._require_watch()
        if self.info.finalized:
            raise PlanError(
                f"Run {self.dir} is finalized. Read it with run.store(), or start a new project "
                "(or pass overwrite=True) to log again."
            )
        if self._current is None:
            pending = self.pending_passes
            if pending != ["log"]:
                raise PlanError(
                    f"This configuration needs the passes {pending}; loop over your data inside "
                    "`for pass_ in run.plan():`."
                )
            self._start_pass(self._pass_specs()[-1])
        return self._current

    def _query_spec(self) -> PassSpec:
        self._require_watch()
        if not self.info.finalized:
            raise PlanError("Log queries after the training rows: call run.finalize() first.")
        if QUERY_STORE not in self._sinks:
            self._open_sink(QUERY_STORE)
        return PassSpec("queries", "log", covariance=False, gradients=True,
                        per_token=self.config.capture.per_token)

    def _begin(self, ctx: LogContext) -> BatchCapture | None:
        spec = self._query_spec() if ctx.store == QUERY_STORE else self._active_spec()
        ctx.spec = spec
        ids, keep = None, None
        if spec.gradients and spec.rows:
            if ctx.data_id is None:
                raise BatchError("data_id is required while logging rows: pass one id per example.")
            ids, id_type = normalise_ids(ctx.data_id)
            sink = self._sinks[ctx.store]
            sink.check_id_type(id_type)
            keep = sink.keep_mask(ids)
            if not keep.any():
                ctx.skipped = True
                return None
        elif ctx.data_id is not None:
            ids, _ = normalise_ids(ctx.data_id)
        mask = ctx.mask
        if mask is not None:
            mask = self._check_mask(mask, None if ids is None else len(ids))
        ctx.ids = ids
        ctx.keep = keep
        projections = self.projections
        if spec.space == "full":
            projections = {n: ModuleProjection(None, None) for n in self._names()}
        capture = BatchCapture(
            self.watched, projections, spec, None if ids is None else len(ids), mask,
            None if keep is None or bool(keep.all()) else keep, self._compute_dtype,
        )
        capture.attach()
        return capture

    def _check_mask(self, mask: Tensor, n_ids: int | None) -> Tensor:
        if not isinstance(mask, Tensor) or mask.dim() < 1:
            raise BatchError("mask must be a tensor shaped like the model input (batch, seq_len).")
        if n_ids is not None and mask.shape[0] != n_ids:
            raise BatchError(f"mask has {mask.shape[0]} rows but data_id has {n_ids} ids.")
        if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
            raise BatchError("mask must hold only 0 and 1 (1 = real token, 0 = padding).")
        return mask.to(torch.bool)

    def _end(self, ctx: LogContext, capture: BatchCapture) -> None:
        result = capture.finish()
        spec = ctx.spec
        if spec.name == "queries":
            self._record_rows(ctx, result)
            return
        if spec.space == "full":
            self._full_stats.merge(result.stats)
            return
        self._stats.merge(result.stats)
        if not spec.gradients:
            return
        if spec.gradient_stats:
            grads = {n: g.detach().to("cpu") for n, g in result.grads.items()}
            keep = ctx.keep if ctx.keep is not None else torch.ones(len(next(iter(grads.values()))), dtype=torch.bool)
            self._update_gradient_stats(grads, keep)
        if spec.rows:
            self._record_rows(ctx, result)

    def _record_rows(self, ctx: LogContext, result: BatchResult) -> None:
        keep = ctx.keep
        grads = {n: g.detach().to("cpu") for n, g in result.grads.items()}
        new_ids = [i for i, k in zip(ctx.ids, keep.tolist()) if k]
        ids = new_ids
        store_dtype = row_dtype(self.config.store.dtype.value)
        if result.token_grads is None:
            rows = torch.cat([grads[n].flatten(1) for n in self._names()], dim=1)
            if len(new_ids) < len(ctx.ids):
                rows = rows[keep]
            positions = None
        else:
            rows, ids, positions = self._token_rows(ctx, result, keep)
        self._sinks[ctx.store].add(rows.to(store_dtype), ids, positions, new_ids)

    def _token_rows(self, ctx: LogContext, result: BatchResult, keep: Tensor):
        tok = {n: t.detach().to("cpu") for n, t in result.token_grads.items()}
        first = tok[self._names()[0]]
        batch, n_tok = first.shape[:2]
        valid = keep[:, None].expand(batch, n_tok).clone()
        if ctx.mask is not None:
            valid &= ctx.mask.to("cpu", torch.bool).reshape(batch, n_tok)
        rows = torch.cat([tok[n][valid].flatten(1) for n in self._names()], dim=1)
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        ids = [ctx.ids[b] for b in b_idx.tolist()]
        return rows, ids, t_idx.numpy().astype(np.int64)

    def _update_gradient_stats(self, grads: dict[str, Tensor], keep: Tensor) -> None:
        cfg = self.config.statistics
        n_new = float(keep.sum())
        dtype = self._accum_dtype()
        for name in self._names():
            g = grads[name][keep].to(dtype) if cfg.ekfac or cfg.raw else None
            if cfg.ekfac:
                q_a = self._stats.raw_sum(name, "A_evecs").to(dtype)
                q_s = self._stats.raw_sum(name, "S_evecs").to(dtype)
                rotated = q_s.T @ g @ q_a
                self._stats.add(name, "ekfac", (rotated**2).sum(0))
            if cfg.raw:
                flat = g.flatten(1)
                if flat.shape[1] > cfg.raw_max_dim:
                    raise WatchError(
                        f"Module {name!r}: its logged block has {flat.shape[1]} entries, above "
                        f"statistics.raw_max_dim={cfg.raw_max_dim}; lower its ranks or disable raw."
                    )
                self._stats.add(name, "raw", flat.T @ flat)
            self._stats.add(name, "examples", n_new)
        if cfg.raw_joint:  # the whole row's covariance (raw-joint preconditioner); dim checked in watch()
            rows = torch.cat([grads[name][keep].to(dtype).flatten(1) for name in self._names()], dim=1)
            self._stats.add(JOINT, "raw", rows.T @ rows)
            self._stats.add(JOINT, "examples", n_new)

    # ---- ending -----------------------------------------------------------------------
    def finalize(self) -> Store:
        """Finish the log pass: commit buffered rows, save statistics, close the store.

        Raises:
            PlanError: passes of the plan did not run yet.
        """
        if self._current is not None:
            if self._current.name != "log":
                raise PlanError(f"Pass {self._current.name!r} is unfinished; complete run.plan().")
            self._finish_pass()
        if self.pending_passes:
            raise PlanError(f"finalize() called before the passes {self.pending_passes} ran.")
        if not self.info.finalized:
            self.dist.on_main(self.info.mark_finalized)
            self.info.finalized = True
        if any(self.dist.all_gather_object(QUERY_STORE in self._sinks)):  # some rank logged queries
            self._close_sink(QUERY_STORE)
        self.dist.barrier()
        return self.store()

    def close(self) -> None:
        """Commit what was logged so far without finishing the pass (resume later)."""
        try:
            for sink in self._sinks.values():
                sink.close()
        finally:
            self._sinks.clear()
            self._current = None

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
        return Store(self.dir / "stores" / name)

    @property
    def statistics(self) -> Statistics:
        """Log-space statistics (finalized after the log pass)."""
        if self._stats is None:
            raise PlanError("No statistics yet: run the plan first.")
        return self._stats

    @property
    def full_statistics(self) -> Statistics | None:
        """Full-space covariances from the PCA covariance pass, if one ran."""
        return self._full_stats

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, modules={len(self.watched)}, pending={self.pending_passes})"


class LogContext:
    """``with run(data_id=..., mask=...):`` — captures one batch; hooks removed on exit."""

    def __init__(self, run: Run, data_id: Any, mask: Tensor | None, store: str = "train") -> None:
        self.run = run
        self.data_id = data_id
        self.mask = mask
        self.store = store
        self.spec: PassSpec | None = None
        self.ids: list | None = None
        self.keep: Tensor | None = None
        self.skipped = False
        self._capture: BatchCapture | None = None

    def __enter__(self) -> LogContext:
        self._capture = self.run._begin(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        capture, self._capture = self._capture, None
        if capture is None:
            return
        try:
            if exc_type is None:
                self.run._end(self, capture)
        finally:
            capture.detach()


def init(
    project: str,
    config: Config | dict | str | Path | None = None,
    root: str | Path | None = None,
    overwrite: bool = False,
    distributed: bool | None = None,
) -> Run:
    """Create or resume the run ``<root>/<project>``; see :class:`Run`.

    Under an initialised ``torch.distributed`` group every rank must call it (the run is
    shared); ``distributed=False`` makes a run of this process alone."""
    return Run(project, config=config, root=root, overwrite=overwrite, distributed=distributed)


def load_run_store(run_dir: str | Path, name: str = TRAIN_STORE) -> Store:
    """Open a store of a finished (or interrupted) run directory."""
    path = Path(run_dir) / "stores" / name
    if read_manifest(path) is None:
        raise RunDirectoryError(f"{run_dir} has no store named {name!r}.")
    return Store(path)


def _add_flat(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out
