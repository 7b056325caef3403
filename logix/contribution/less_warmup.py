"""LESS, logging side: what a checkpoint logs (:func:`less_extract`), the Trainer callback that logs
it (:func:`less_callback`), and the warm-up training of LESS steps 1-2 (:func:`warmup_and_log`).

Losses: LESS (and the Trainer) uses the *mean* cross-entropy over an example's label tokens;
the Adam transform is not scale invariant (``g`` is combined with the moments of mean-reduced
batch losses), so the warm-up logs with :func:`~logix.contribution.less_rows.token_mean_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from logix.capture.run import Run
from logix.config import Config, resolve_config
from logix.contribution.less_moments import VARIANTS, check_variant, optimizer_moments, save_moments
from logix.contribution.less_rows import AdamContext, AdamRowWriter, log_adam_rows, token_mean_loss
from logix.errors import ConfigError, DistributedError
from logix.integrations.batches import example_id
from logix.integrations.loop import extract
from logix.store import Store
from logix.store.format import write_json_atomic
from logix.store.rundir import LESS_DIR, LESS_TRAINER_DIR, less_file, moments_file

if TYPE_CHECKING:
    from logix.integrations.huggingface import LogixCallback


def less_extract(
    run: Run,
    model: nn.Module,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    collator: Callable,
    *,
    optimizer: Any,
    adam_rows: bool | Sequence[str] = True,
    **kwargs: Any,
) -> Store:
    """:func:`~logix.integrations.extract` plus what LESS needs of a checkpoint.

    Saves the optimizer's Adam moments by parameter name (``optimizer.safetensors`` in the run
    directory) and, with ``adam_rows`` (True: both variants, or a list of variants), writes the
    Adam rows of ``dataset`` in the same forward / backward passes as the plain train rows (the
    Adam capture rides along the log pass); rows a resumed or earlier-finalized run did not
    produce there are logged by :func:`log_adam_rows`. ``kwargs`` go to ``extract``.
    """
    if run.dist.active:
        raise DistributedError(
            "LESS rows (optimizer_states / adam_rows) are logged by one process: the optimizer's moments "
            "are per-rank state (sharded under FSDP). Log the LESS checkpoints without torchrun / "
            "accelerate launch, or leave optimizer_states and adam_rows off under several processes."
        )
    moments = optimizer_moments(model, optimizer)
    if not adam_rows:
        store = extract(run, model, dataset, collator, **kwargs)
        save_moments(moments_file(run.dir), moments)  # after extract checked the model state
        return store
    variants = VARIANTS if adam_rows is True else tuple(adam_rows)
    for v in variants:
        check_variant(v)
    writer: AdamRowWriter | None = None

    def capture(data_id: Any = None, mask: Tensor | None = None) -> AdamContext:
        nonlocal writer
        if writer is None:  # built once the run is watched (and a PCA projection exists)
            writer = AdamRowWriter(run, model, moments, variants)
        return writer(data_id, mask)

    try:
        store = extract(run, model, dataset, collator, row_capture=capture, **kwargs)
    finally:
        if writer is not None:
            writer.close()
    save_moments(moments_file(run.dir), moments)  # after extract checked the model state
    rows_kwargs = {k: kwargs[k] for k in ("batch_size", "ids", "id_field", "limit", "loss_fn", "progress") if k in kwargs}
    log_adam_rows(run, model, dataset, collator, moments, variants=variants, **rows_kwargs)
    return store


def less_callback(
    config: Config | Mapping | str | Path | None = None,
    *,
    optimizer_states: bool = True,
    adam_rows: bool | Sequence[str] = True,
    **kwargs: Any,
) -> LogixCallback:
    """A :class:`~logix.integrations.huggingface.LogixCallback` that logs what LESS needs at each checkpoint.

    Args:
        config: as for ``LogixCallback``.
        optimizer_states: also save the optimizer's Adam moments, keyed by parameter name, in
            each checkpoint's ``optimizer.safetensors``.
        adam_rows: also log each training example's projected Adam-preconditioned gradient
            into the checkpoint's ``train_adam`` / ``train_adam_code`` stores; ``True``: both
            variants, or a list of ``"paper"`` / ``"code"``. Implies ``optimizer_states``.
        kwargs: the other ``LogixCallback`` arguments (``project``, ``train_dataset``,
            ``queries``, ``loss_fn``, ...).
    """
    from logix.integrations.huggingface import LogixCallback

    if optimizer_states or adam_rows:  # Adam moments by parameter name, Adam-preconditioned rows
        kwargs["extractor"] = functools.partial(less_extract, adam_rows=adam_rows)
    return LogixCallback(config, **kwargs)


@dataclass
class Warmup:
    """What :func:`warmup_and_log` did: the project directory to score, the trainer, the subset."""

    project_dir: Path
    trainer: Any
    warmup_ids: list
    tasks: dict[str, list]


def less_config(config: Config | Mapping | str | Path | None = None, epochs: int = 4,
                batch_size: int = 8) -> Config:
    """``config`` set up for LESS: log at each epoch end, no curvature statistics (LESS uses none)."""
    cfg = resolve_config(config)
    return cfg.replace(
        statistics=dataclasses.replace(cfg.statistics, kfac=False, ekfac=False, raw=False),
        schedule=dataclasses.replace(cfg.schedule, epochs=tuple(range(1, epochs + 1)), at_end=False,
                                     at_start=False, steps=(), every_n_steps=0, batch_size=batch_size),
    )


def warmup_and_log(
    model: nn.Module,
    pool: Dataset | Sequence[Mapping[str, Any]],
    validation: Mapping[str, Dataset | Sequence[Mapping[str, Any]]],
    collator: Callable,
    *,
    fraction: float = 0.05,
    epochs: int = 4,
    lr: float = 2e-5,
    batch_size: int = 8,
    config: Config | Mapping | str | Path | None = None,
    project: str = LESS_DIR,
    root: str | Path | None = None,
    seed: int = 0,
    variants: Sequence[str] = VARIANTS,
    log_batch_size: int = 16,
    training_args: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    progress: bool = True,
) -> Warmup:
    """LESS steps 1-2: warm up LoRA on a random ``fraction`` of ``pool``, logging at each epoch end.

    Trains ``model`` (a PEFT LoRA model: only the adapters train) with the HF ``Trainer``
    (AdamW, linear schedule with 3% warm-up, as in LESS) on a seeded random subset of the pool.
    At each epoch end :class:`LogixCallback` logs, with :func:`token_mean_loss`, every pool
    example's projected Adam rows (and plain rows) and every validation example's plain
    projected gradient; ``less.json`` records each subtask's validation ids and the subset.
    Score with ``less_scores(result.project_dir)``.

    Args:
        validation: subtask name -> its validation examples (ids must be unique across tasks).
        fraction: share of the pool used for warm-up training (at least one example).
        training_args: extra ``TrainingArguments`` (override the defaults above).
    """
    from transformers import Trainer, TrainingArguments

    from logix.integrations.progress import show_progress

    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}.")
    if not validation:
        raise ConfigError("validation must map at least one subtask name to its examples.")
    for v in variants:
        check_variant(v)
    cfg = less_config(config, epochs, log_batch_size)
    if root is not None:
        cfg = cfg.replace(root=str(root))
    policy, id_field = cfg.data.ids, cfg.data.id_field
    tasks: dict[str, list] = {}
    val_items: list = []
    for task, items in validation.items():
        tasks[str(task)] = [example_id(items[i], policy, id_field) for i in range(len(items))]
        val_items.extend(items[i] for i in range(len(items)))
    all_val = [i for ids in tasks.values() for i in ids]
    if len(set(all_val)) != len(all_val):
        raise ConfigError("Validation ids repeat across tasks: give every validation example a unique id.")
    n = max(1, round(fraction * len(pool)))
    subset = sorted(random.Random(seed).sample(range(len(pool)), n))
    warm = torch.utils.data.Subset(pool, subset)
    warmup_ids = [example_id(pool[i], policy, id_field) for i in subset]
    project_dir = Path(cfg.root) / project
    callback = less_callback(cfg, project=project, train_dataset=pool, queries=val_items, data_collator=collator,
                             loss_fn=token_mean_loss, overwrite=overwrite, progress=progress,
                             optimizer_states=True, adam_rows=tuple(variants))
    defaults = dict(
        output_dir=str(project_dir / LESS_TRAINER_DIR), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0.03, weight_decay=0.0, seed=seed,
        save_strategy="no", report_to=[], logging_strategy="epoch" if progress else "no", disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )
    defaults.update(training_args or {})
    trainer = Trainer(model=model, args=TrainingArguments(**defaults), train_dataset=warm,
                      data_collator=collator, callbacks=[callback])
    show_progress(trainer, progress).train()
    write_json_atomic(less_file(project_dir), {"tasks": tasks, "warmup_ids": warmup_ids, "fraction": fraction,
                                                "variants": list(variants), "seed": seed})
    return Warmup(project_dir, trainer, warmup_ids, tasks)
