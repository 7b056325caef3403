"""HuggingFace ``Trainer`` integration: logix in two lines.

.. code-block:: python

    from logix.integrations.huggingface import LogixCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[LogixCallback("configs/quickstart.yaml")])
    trainer.train()

At each point the config's ``schedule`` names (epoch ends, steps, every N steps, the start,
the end), the callback pauses training and logs every training example -- and the queries,
when given -- with the model as it is at that checkpoint, into
``<root>/<project>/<checkpoint>``. The per-example loss is the *sum* over the example's label
tokens (``-100`` ignored) whatever the Trainer's loss reduction; gradient accumulation does not
matter (logging happens between optimizer steps); the optimizer state, parameter gradients,
RNG states and train/eval mode are restored before training resumes, so training is exactly
what it would be without the callback. ``TrainingArguments`` are never changed.

Each checkpoint is an ordinary logix run (every pass its plan needs: PCA covariance, EK-FAC
eigenbasis, log); ``checkpoints.json`` in the project directory lists them with their step,
epoch and learning rate (the mean rate of the steps since the previous checkpoint), which
:func:`logix.analysis.influence` turns into TracIn-style weighted influence.

Under ``accelerate launch`` / ``torchrun`` every process logs its own share of the examples
into the same checkpoint run (one logical store; statistics summed over processes); the
main process alone writes ``checkpoints.json``. See docs/distributed.md.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset, IterableDataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from logix.capture.run import Run
from logix.config import Config, IdPolicy, resolve_config
from logix.core.distributed import Dist
from logix.integrations.loop import extract
from logix.integrations.losses import LossFn, summed_loss
from logix.integrations.trackers import TrackerWriter, calling_trainer, capture_summary
from logix.store.format import write_json_atomic
from logix.store.guard import check_project_name, open_directory
from logix.store.rundir import CHECKPOINTS_FILE, checkpoints_file

log = logging.getLogger("logix")



class LogixCallback(TrainerCallback):
    """Logs per-example projected gradients at the checkpoints ``config.schedule`` names.

    Args:
        config: a :class:`logix.Config`, a mapping or a YAML path.
        project: directory of the checkpoints' runs under ``config.root``.
        root: overrides ``config.root``.
        train_dataset: examples to log (default: the Trainer's own ``train_dataset``, with the
            columns its ``remove_unused_columns`` strips from the dataloader, such as ``id``).
        queries: examples whose influence will be explained, logged at every checkpoint.
        data_collator: collates logged examples (default: the Trainer's).
        loss_fn: per-example summed loss (default :func:`logix.integrations.summed_loss`).
        overwrite: delete an existing project directory first (default: resume it; a checkpoint
            directory logged with another model state is then an error, never silently reused).
        progress: show progress bars while logging.
        extractor: what logs one checkpoint, in place of :func:`logix.integrations.extract`
            (the default): called as ``extract`` is, plus ``optimizer=`` (the Trainer's
            optimizer), e.g. LESS's extractor, which also saves the optimizer's Adam moments
            and Adam-preconditioned rows (``logix.contribution.less_warmup.less_callback``).
        report_to: trackers that get a summary of each logged checkpoint (rows, seconds, bytes,
            modules, non-finite skips): default the Trainer's ``TrainingArguments.report_to``
            (TensorBoard and W&B are served); ``"none"`` for none. See docs/integrations.md.
    """

    def __init__(
        self,
        config: Config | Mapping | str | Path | None = None,
        project: str = "trainer",
        root: str | Path | None = None,
        train_dataset: Dataset | Sequence[Mapping[str, Any]] | None = None,
        queries: Dataset | Sequence[Mapping[str, Any]] | None = None,
        data_collator: Callable | None = None,
        loss_fn: LossFn = summed_loss,
        overwrite: bool = False,
        progress: bool = True,
        extractor: Callable | None = None,
        report_to: str | Sequence[str] | None = None,
    ) -> None:
        self.config = resolve_config(config)
        if root is not None:
            self.config = self.config.replace(root=str(root))
        self.project = check_project_name(project)
        self.dir = Path(self.config.root) / project
        dist = Dist.current()
        # one writer per project; overwrite deletes only a logix project inside root
        self._lease = open_directory(self.dir, self.config.root, overwrite, "project directory") \
            if dist.is_main else None
        if overwrite:
            dist.barrier()
        self.train_dataset = train_dataset
        self._warned_ids = False
        self.queries = queries
        self.data_collator = data_collator
        self.loss_fn = loss_fn
        self.progress = progress
        self.extractor = extractor
        self.report_to = report_to
        self._trackers: TrackerWriter | None = None
        self.checkpoints: list[dict[str, Any]] = self._read_checkpoints()
        self._dataloader = None
        self._trainer_dataset = None
        self._step_lr: dict[int, float] = {}  # optimizer step (1-based) -> its learning rate
        self._logged_steps: set[int] = set()  # model states logged during this training run

    # ---- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._dataloader = kwargs.get("train_dataloader")
        self._trainer_dataset = _calling_trainer_dataset()
        self._logged_steps = set()
        self._fresh = state.global_step == 0  # a new training run, not a resumed one
        if state.is_world_process_zero:
            self._trackers = TrackerWriter.for_trainer(args, self.report_to)
        if self.config.schedule.at_start:
            self._log(state, kwargs, "start")

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        lr = _learning_rate(kwargs, state)
        if lr is not None:
            self._step_lr.setdefault(state.global_step + 1, lr)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        sched, step = self.config.schedule, state.global_step
        if step in sched.steps or (sched.every_n_steps and step % sched.every_n_steps == 0):
            self._log(state, kwargs, f"step-{step}")

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        epoch = round(state.epoch or 0)
        if epoch in self.config.schedule.epochs:
            self._log(state, kwargs, f"epoch-{epoch}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.config.schedule.at_end:
            self._log(state, kwargs, "final")
        if getattr(self, "_fresh", False) and state.is_world_process_zero:
            self._drop_stale()
        if self._trackers is not None:
            self._trackers.close()
        Dist.current().barrier()  # every process leaves training once the index is written

    def _drop_stale(self) -> None:
        """Forget checkpoints an earlier training run logged that this one did not log again."""
        stale = [c for c in self.checkpoints if c["step"] not in self._logged_steps]
        if not stale:
            return
        log.warning("logix: %s lists checkpoints of an earlier training run (%s); they are dropped "
                    "from the index (their directories are left in place)", self.dir / CHECKPOINTS_FILE,
                    ", ".join(c["name"] for c in stale))
        self.checkpoints = [c for c in self.checkpoints if c["step"] in self._logged_steps]
        write_json_atomic(checkpoints_file(self.dir), {"checkpoints": self.checkpoints})

    # ---- logging one checkpoint ---------------------------------------------------------------
    def _log(self, state: TrainerState, kwargs: dict[str, Any], name: str) -> None:
        if state.global_step in self._logged_steps:
            return  # this model state is already logged under another name
        model: nn.Module = kwargs["model"]
        run = Run(f"{self.project}/{name}", config=self.config)
        sched = self.config.schedule
        log.info("logix: logging checkpoint %s (step %d)", name, state.global_step)
        log_fn: Callable = extract
        if self.extractor is not None:
            log_fn = functools.partial(self.extractor, optimizer=kwargs.get("optimizer"))
        started = time.perf_counter()
        log_fn(
            run, model, self._dataset(), self._collator(), queries=self.queries,
            batch_size=sched.batch_size, ids=self.config.data.ids, id_field=self.config.data.id_field,
            limit=sched.max_examples, loss_fn=self.loss_fn, progress=self.progress,
        )
        if self._trackers is not None and self._trackers.trackers:
            self._trackers.log(capture_summary(run, time.perf_counter() - started), state.global_step)
        self._logged_steps.add(state.global_step)
        if state.is_world_process_zero:
            self._record(name, state, self._interval_lr(state.global_step), _learning_rate(kwargs, state))
        else:  # keep the same in-memory index as the main process
            self.checkpoints = [c for c in self.checkpoints if c["name"] != name] + [
                {"name": name, "step": state.global_step, "dir": name}]

    def _dataset(self) -> Dataset | Sequence:
        if self.train_dataset is not None:
            return self.train_dataset
        if self._trainer_dataset is not None:  # the ids the dataloader's copy may have lost
            return self._trainer_dataset
        if self._dataloader is None:
            raise RuntimeError("LogixCallback has no training data: pass train_dataset=... .")
        dataset = self._dataloader.dataset
        self._warn_if_ids_were_dropped(dataset)
        return dataset

    def _warn_if_ids_were_dropped(self, dataset) -> None:
        """The Trainer hands a datasets.Dataset out without the columns its model does not take
        (``remove_unused_columns``): an id column is gone, and ids would silently become hashes."""
        field = self.config.data.id_field
        columns = getattr(dataset, "column_names", None)
        if self._warned_ids or columns is None or field in columns or self.config.data.ids is not IdPolicy.AUTO:
            return
        self._warned_ids = True
        log.warning(
            "logix: the Trainer's training dataset has no %r column (TrainingArguments.remove_unused_columns "
            "drops the columns the model's forward does not take), so train ids are hashes of the tokens. To "
            "keep your dataset's ids, pass it to the callback too: LogixCallback(..., train_dataset=train_ds).",
            field,
        )

    def _collator(self) -> Callable:
        if self.data_collator is not None:
            return self.data_collator
        if self._dataloader is None:
            raise RuntimeError("LogixCallback has no collator: pass data_collator=... .")
        return self._dataloader.collate_fn

    def _interval_lr(self, step: int) -> float | None:
        """Mean learning rate of the optimizer steps since the previous logged checkpoint.

        This is the checkpoint's TracIn / LESS weight: the learning-rate mass of the stretch of
        training it stands for. ``None`` before any step (the ``start`` checkpoint).
        """
        previous = max((c["step"] for c in self.checkpoints if c["step"] < step), default=0)
        lrs = [lr for s, lr in self._step_lr.items() if previous < s <= step]
        return sum(lrs) / len(lrs) if lrs else None

    def _record(self, name: str, state: TrainerState, lr: float | None, next_lr: float | None) -> None:
        entry = {"name": name, "step": state.global_step, "epoch": state.epoch,
                 "learning_rate": next_lr if lr is None else lr, "next_learning_rate": next_lr,
                 "dir": name}
        self.checkpoints = [c for c in self.checkpoints if c["name"] != name] + [entry]
        write_json_atomic(checkpoints_file(self.dir), {"checkpoints": self.checkpoints})

    def _read_checkpoints(self) -> list[dict[str, Any]]:
        path = checkpoints_file(self.dir)
        return json.loads(path.read_text())["checkpoints"] if path.exists() else []

    def runs(self) -> list[Run]:
        """The logged checkpoints' runs, in logging order."""
        return [Run(f"{self.project}/{c['dir']}", config=self.config) for c in self.checkpoints]


def _calling_trainer_dataset() -> Dataset | None:
    """The ``train_dataset`` of the Trainer whose event is being handled, as the user gave it.

    The dataloader the Trainer hands its callbacks holds a copy of a ``datasets.Dataset`` without
    the columns the model's forward does not take (``remove_unused_columns``), the id column among
    them; the Trainer keeps the original. Callbacks are not given the Trainer, so it is found on
    the call stack (the Trainer method that fired the event). None when there is none, or when its
    dataset is not a map-style dataset of a known length (then the dataloader's is used).
    """
    data = getattr(calling_trainer(), "train_dataset", None)
    return data if isinstance(data, Sized) and not isinstance(data, IterableDataset) else None


def _learning_rate(kwargs: dict[str, Any], state: TrainerState) -> float | None:
    """The learning rate the optimizer uses now (the scheduler's, else the last logged one)."""
    scheduler = kwargs.get("lr_scheduler")
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        try:
            return float(scheduler.get_last_lr()[0])
        except (IndexError, TypeError):
            pass
    for entry in reversed(state.log_history or []):
        if "learning_rate" in entry:
            return float(entry["learning_rate"])
    return None
