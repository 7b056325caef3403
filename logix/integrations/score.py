"""Score new examples against a finished run's stored rows, without logging them first.

.. code-block:: python

    result = logix.score(run, batch)                       # the run's watched model, one batch
    result = logix.score("logix_runs/p", examples, model=model, collator=collate, top_k=20)
    result.top_ids[0], result.top_scores[0]                # proponents of the first example

The examples' gradients are captured in memory (:meth:`logix.Run.capture`: same modules and
projection as the train rows, nothing written to the run), then scored against every train
row exactly (the streaming scan of :func:`logix.analysis.compute_influence`), or through the
run's faiss index when one was built (``logix index``; ``use_index``). The model must be the
state the train rows were logged with: another state is an error (:mod:`logix.capture.fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logix.analysis.api import index_influence, index_run_dir
from logix.analysis.checkpoints import load_checkpoint
from logix.analysis.faiss_index import index_status
from logix.analysis.influence import InfluenceResult, compute_influence
from logix.capture.run import Run
from logix.config import Config, IdPolicy, PreconditionerType, ScoreMode
from logix.config.damping import Damping
from logix.errors import LogixError
from logix.integrations.batches import loader_with_ids
from logix.integrations.loop import held_fixed, watched_weights_trainable
from logix.integrations.losses import LossFn, summed_loss
from logix.store.rundir import config_file


def open_run(run_dir: str | Path, model: nn.Module) -> Run:
    """A finished run directory opened with its own config, watching ``model``."""
    run_dir = index_run_dir(run_dir)
    if not config_file(run_dir).is_file():
        raise LogixError(f"{run_dir} is not a logix run directory (no {config_file(run_dir).name}).")
    config = Config.from_yaml(config_file(run_dir)).replace(root=str(run_dir.parent))
    run = Run(run_dir.name, config=config)
    if not run.finalized:
        raise LogixError(f"{run_dir} is not finalized: finish logging its train rows before scoring against them.")
    run.watch(model)
    return run


def capture_rows(run: Run, examples: Mapping[str, Tensor] | Sequence[Mapping[str, Any]], *,
                 model: nn.Module, ids: Sequence | None = None, collator: Callable | None = None,
                 loss_fn: LossFn = summed_loss, batch_size: int = 16) -> tuple[Tensor, list]:
    """The examples' rows, projected like ``run``'s train rows, and their ids (in memory).

    ``examples`` is one collated batch (a mapping of tensors, ids from ``ids`` or its ``id``
    entry, else ``0..n-1``) or a sequence of dataset items collated by ``collator`` in batches
    (ids from their id column or a hash of the tokens, as :func:`logix.integrations.extract`).
    """
    batches: list[tuple[list, Mapping[str, Tensor]]]
    if isinstance(examples, Mapping):
        batch = {k: v for k, v in examples.items() if k != "id"}
        n = len(next(v for v in batch.values() if isinstance(v, Tensor)))
        given = ids if ids is not None else examples.get("id")
        batches = [(list(range(n)) if given is None else list(given), batch)]
    else:
        if collator is None:
            raise LogixError("Scoring a sequence of dataset items needs collator=... (or pass one collated batch).")
        batches = list(loader_with_ids(examples, collator, model, batch_size, IdPolicy.AUTO))
        if ids is not None:
            flat = list(ids)
            if len(flat) != sum(len(b[0]) for b in batches):
                raise LogixError(f"{len(flat)} ids for {sum(len(b[0]) for b in batches)} examples.")
            cursor = 0
            for i, (b_ids, batch) in enumerate(batches):
                batches[i] = (flat[cursor:cursor + len(b_ids)], batch)
                cursor += len(b_ids)
    device = next(model.parameters()).device
    rows, row_ids = [], []
    with held_fixed(model), watched_weights_trainable(run):
        for b_ids, batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            with run.capture(data_id=b_ids, mask=batch.get("attention_mask")) as block:
                loss_fn(model, batch).backward()
            model.zero_grad(set_to_none=True)
            if block.rows is not None:
                rows.append(block.rows)
                row_ids.extend(block.row_ids)
    if not rows:
        raise LogixError("No example to score (every one was dropped as non-finite).")
    return torch.cat(rows), row_ids


def score(
    run: Run | str | Path,
    examples: Mapping[str, Tensor] | Sequence[Mapping[str, Any]],
    *,
    model: nn.Module | None = None,
    ids: Sequence | None = None,
    collator: Callable | None = None,
    loss_fn: LossFn = summed_loss,
    batch_size: int = 16,
    preconditioner: PreconditionerType | str = PreconditionerType.AUTO,
    damping: Damping | float | None = None,
    mode: ScoreMode | str = ScoreMode.DOT,
    top_k: int = 10,
    use_index: bool | None = None,
    nprobe: int | None = None,
    rerank: int = 10,
    progress: bool = False,
) -> InfluenceResult:
    """Influence of every train row of a finished run on new examples, logged nowhere.

    Args:
        run: a finalized :class:`logix.Run` (its watched model is used by default), or a run
            directory (or a project of one logged checkpoint; ``model`` is then required).
        examples: one collated batch (mapping of tensors) or a sequence of dataset items.
        model: the model, in the state the train rows were logged with.
        ids: the examples' ids (default: a batch's ``id`` entry / the items' id column, else positions).
        collator: collates dataset items (required for a sequence of items).
        loss_fn: per-example summed loss of a batch (default :func:`logix.integrations.summed_loss`,
            next-token cross-entropy over ``labels``).
        batch_size: examples per forward / backward.
        preconditioner: as :func:`logix.analysis.influence`.
        damping: as :func:`logix.analysis.influence`.
        mode: as :func:`logix.analysis.influence`.
        top_k: proponents and opponents kept per example.
        use_index: score through the run's faiss index (``logix index``): True requires one, None
            (default) uses one when it exists, is fresh and serves ``mode``; False scans every row.
        nprobe: index search parameter (see :meth:`logix.analysis.Index.search`).
        rerank: index search parameter (see :meth:`logix.analysis.Index.search`).
        progress: show a progress bar over the train rows (exact scan).

    Returns:
        An :class:`~logix.analysis.InfluenceResult` with one query per example (no self-influence).

    Raises:
        RunDirectoryError: ``model`` is another state than the one the rows were logged with.
        LogixError: the run is not finalized, or no model / collator was given where needed.
    """
    if isinstance(run, Run):
        model = model if model is not None else run.model
        if model is None:
            raise LogixError("The run watches no model: pass model=... .")
        if run.model is not model:
            run.watch(model)
    else:
        if model is None:
            raise LogixError("Scoring against a run directory needs model=... (the model the rows were logged with).")
        run = open_run(run, model)
    if not run.finalized:
        raise LogixError(f"{run.dir} is not finalized: call run.finalize() after logging the train rows.")
    mode = ScoreMode.parse(mode, "mode")
    rows, row_ids = capture_rows(run, examples, model=model, ids=ids, collator=collator, loss_fn=loss_fn,
                                 batch_size=batch_size)
    if use_index is None:  # a fresh index serving this mode, when there is one
        use_index = index_status(run.dir) == (mode, True)
    if use_index:
        return index_influence(run.dir, preconditioner, damping, mode, top_k=top_k, nprobe=nprobe, rerank=rerank,
                               queries=rows, query_ids=row_ids)
    checkpoint = load_checkpoint(run.dir, preconditioner, damping, queries=rows)
    return compute_influence(checkpoint, query_ids=row_ids, mode=mode, top_k=top_k, self_influence=False,
                             progress=progress)
