"""What the parts of a run share: its directory, the watched modules, the statistics, the open stores."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from logix.capture.engine import Watched
from logix.capture.fingerprint import ModelGuard
from logix.capture.ranks import check_rank_duplicates
from logix.capture.spec import PassSpec
from logix.config import Config, StoreDtype
from logix.core.distributed import Dist
from logix.core.dtypes import torch_dtype
from logix.core.projection import ModuleProjection
from logix.core.statistics import Statistics
from logix.errors import WatchError
from logix.store import Layout
from logix.store.quant import is_quantized
from logix.store.rundir import QUERY_STORE, store_dir
from logix.store.runinfo import RunInfo
from logix.store.sink import StoreSink

log = logging.getLogger("logix")


@dataclass
class RunState:
    """The state of one run that its lifecycle (:class:`~logix.capture.run.Run`), its passes
    (:mod:`logix.capture.passes`) and its blocks (:mod:`logix.capture.block`) work on."""

    config: Config
    dir: Path
    dist: Dist
    info: RunInfo
    watched: list[Watched] = field(default_factory=list)
    projections: dict[str, ModuleProjection] = field(default_factory=dict)
    layout: Layout | None = None
    stats: Statistics | None = None  # log-space statistics
    full_stats: Statistics | None = None  # full-space statistics of the covariance pass
    current: PassSpec | None = None  # the pass running now
    base: dict[str, Tensor] | None = None  # stats carried into the pass (not reduced again)
    sinks: dict[str, StoreSink] = field(default_factory=dict)  # stores being written: train, queries
    committed: set = field(default_factory=set)  # train ids an interrupted session committed (resume)
    guard: ModelGuard | None = None  # the model state the directory's rows describe

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch_dtype(self.config.capture.compute_dtype)

    @property
    def accum_dtype(self) -> torch.dtype:
        return torch_dtype(self.config.statistics.dtype)

    def names(self) -> list[str]:
        return [w.name for w in self.watched]

    def ranks(self, w: Watched) -> tuple[int, int]:
        """``(k_in, k_out)`` of a module: the configured ranks, capped at the module's own
        dimensions (projecting to more dimensions than a side has adds bytes, not information)."""
        k_in, k_out = self.config.rank_for(w.name)
        return min(k_in, w.shape.d_in_aug), min(k_out, w.shape.d_out)

    def require_watch(self) -> None:
        if not self.watched:
            raise WatchError("Call run.watch(model) before logging.")

    # ---- stores being written ---------------------------------------------------------------
    def open_sink(self, name: str, state: Callable[[], dict[str, Tensor]] | None = None) -> StoreSink:
        cfg = self.config
        dtype = cfg.store.dtype.value
        if name == QUERY_STORE and is_quantized(dtype):
            dtype = StoreDtype.FLOAT32.value  # a few rows, scored against every train row: kept exact
        sink = StoreSink(
            store_dir(self.dir, name), self.layout, dtype, cfg.capture.per_token,
            cfg.store.shard_rows, cfg.store.queue_shards, cfg.store.duplicate_ids, state, self.dist.rank,
        )
        self.sinks[name] = sink
        return sink

    def close_sink(self, name: str) -> None:
        """Commit every rank's rows of the store ``name`` (collective; a rank without the store
        open takes part all the same), then check ids across ranks."""
        sink = self.sinks.pop(name, None)
        error = None
        try:
            if sink is not None:
                sink.close()
        except BaseException as exc:  # every rank must learn of it before the next collective
            error = exc
        self.dist.raise_anywhere(error)
        if sink is not None and sink.skipped_duplicates:
            log.warning("logix: skipped %d duplicate ids", sink.skipped_duplicates)
        check_rank_duplicates(self.dist, store_dir(self.dir, name), name, self.config.store.duplicate_ids)
