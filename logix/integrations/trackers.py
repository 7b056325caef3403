"""The Trainer's own experiment trackers (``TrainingArguments.report_to``) get logix's summaries.

When ``report_to`` names TensorBoard and/or Weights & Biases, :class:`TrackerWriter` writes what
logging a checkpoint cost (:func:`capture_summary`: rows, seconds, bytes, modules, non-finite
examples skipped) to the same trackers, at the Trainer's ``global_step``:

* **TensorBoard**: a ``SummaryWriter`` of its own, in the subfolder ``logix`` of the directory the
  Trainer's ``TensorBoardCallback`` writes to, so the summaries show beside the training curves as
  the run ``<run>/logix`` (two writers in one folder would leave TensorBoard watching only the
  newest event file).
* **W&B**: ``log`` on the active run the ``WandbCallback`` started (``wandb.run``), with
  ``train/global_step`` as the step, the step metric that callback declares.

Why not the Trainer's ``on_log``: the ``logs`` a callback receives were already sent, because the
Trainer calls the tracker callbacks before the user's, and the last checkpoint is logged in
``on_train_end``, after the last ``on_log`` and after the TensorBoard callback closed its writer.
A tracker that fails is reported once and left alone: training never stops for a summary.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from logix.errors import StoreError
from logix.store.rundir import QUERY_STORE, TRAIN_STORE

log = logging.getLogger("logix")

PREFIX = "logix/"
SUBDIR = "logix"
REPORT_NONE, REPORT_ALL = "none", "all"  # transformers' own report_to keywords


class Tracker(str, Enum):
    """The ``report_to`` integrations that receive logix's summaries."""

    TENSORBOARD = "tensorboard"
    WANDB = "wandb"


def requested_trackers(report_to: str | Sequence[str] | None) -> list[Tracker]:
    """The trackers a ``report_to`` value names (``"all"``: both; ``"none"`` / None / []: none)."""
    if report_to is None:
        return []
    names = {report_to} if isinstance(report_to, str) else set(report_to)
    if REPORT_NONE in names:
        return []
    if REPORT_ALL in names:
        return list(Tracker)
    return [t for t in Tracker if t.value in names]


def capture_summary(run: Any, seconds: float) -> dict[str, float]:
    """What logging one checkpoint into ``run`` cost and stored, as ``logix/...`` scalars."""
    summary: dict[str, float] = {"seconds": float(seconds)}
    for name, key in ((TRAIN_STORE, "rows"), (QUERY_STORE, "query_rows")):
        try:
            store = run.store(name)
        except StoreError:
            continue
        summary[key] = float(store.n_rows)
        if name == TRAIN_STORE:
            summary["modules"] = float(len(store.modules))
            summary["row_dim"] = float(store.dim)
            summary["row_bytes"] = float(store.nbytes())
    if summary.get("rows") and seconds > 0:
        summary["rows_per_second"] = summary["rows"] / seconds
    summary["disk_bytes"] = float(sum(p.stat().st_size for p in Path(run.dir).rglob("*") if p.is_file()))
    info = run.info
    summary["nonfinite_skipped"] = float(sum(len(ids) for ids in info.skipped_nonfinite.values()))
    summary["nonfinite_batches"] = float(sum(info.nonfinite_batches.values()))
    return {PREFIX + k: v for k, v in summary.items()}


class TrackerWriter:
    """Writes scalars to the trackers of one training run; :meth:`close` when training ends."""

    def __init__(self, trackers: Sequence[Tracker], tensorboard_dir: Path | None = None) -> None:
        self.trackers = list(trackers)
        self.tensorboard_dir = tensorboard_dir
        self._tb: Any = None
        self._failed: set[Tracker] = set()

    @classmethod
    def for_trainer(cls, args: Any, report_to: str | Sequence[str] | None = None) -> TrackerWriter:
        """The trackers of ``report_to`` (default: ``args.report_to``, the Trainer's)."""
        trackers = requested_trackers(args.report_to if report_to is None else report_to)
        tb_dir = tensorboard_dir(args) if Tracker.TENSORBOARD in trackers else None
        return cls(trackers, tb_dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write ``metrics`` at the training step ``step`` to every tracker that works."""
        for tracker in self.trackers:
            if tracker in self._failed:
                continue
            try:
                if tracker is Tracker.TENSORBOARD:
                    self._tensorboard(metrics, step)
                else:
                    self._wandb(metrics, step)
            except Exception as exc:  # a tracker never stops training
                self._failed.add(tracker)
                log.warning("logix: could not write summaries to %s (%s: %s); it gets no more of them",
                            tracker.value, type(exc).__name__, exc)

    def _tensorboard(self, metrics: Mapping[str, float], step: int) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(log_dir=str(self.tensorboard_dir))
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def _wandb(self, metrics: Mapping[str, float], step: int) -> None:
        wandb = sys.modules.get("wandb")  # imported by the Trainer's WandbCallback when it is used
        run = getattr(wandb, "run", None)
        if run is None:
            raise RuntimeError("no active W&B run (wandb.run is None)")
        run.log({**metrics, "train/global_step": step})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def tensorboard_dir(args: Any) -> Path:
    """``<dir>/logix``, where ``<dir>`` is where the Trainer's TensorBoard callback writes.

    Found in order: that callback's ``logging_dir`` (the Trainer whose event is handled is on the
    call stack), ``$TENSORBOARD_LOGGING_DIR``, ``args.logging_dir`` (transformers 4), else
    ``<output_dir>/runs``.
    """
    found = _trainer_tensorboard_dir() or os.environ.get("TENSORBOARD_LOGGING_DIR") \
        or getattr(args, "logging_dir", None)
    base = Path(os.path.expanduser(found)) if found else Path(args.output_dir) / "runs"
    return base / SUBDIR


def calling_trainer(depth: int = 24):
    """The ``transformers.Trainer`` whose method is on the call stack (the one firing a callback
    event: callbacks are not handed their Trainer), or None."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
        return None
    finally:
        del frame


def _trainer_tensorboard_dir() -> str | None:
    """The ``logging_dir`` of the TensorBoard callback of the Trainer on the call stack, if any."""
    from transformers.integrations import TensorBoardCallback

    trainer = calling_trainer()
    for callback in [] if trainer is None else trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "logging_dir", None):
            return str(callback.logging_dir)
    return None
