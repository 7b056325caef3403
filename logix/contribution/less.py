"""LESS: select instruction data by the gradient similarity of a warmed-up LoRA model.

LESS (Xia et al., 2024) scores a candidate training example ``z`` by how well its
Adam-preconditioned update agrees with the gradients of a few validation examples of the
target tasks, over the checkpoints of a short *warm-up* LoRA training on a small random
subset of the pool:

    score(z) = max_j  sum_i  w_i  cos( gbar_ij , Gamma_i(z) )

* ``i`` runs over the warm-up checkpoints (each epoch end), ``w_i`` is the checkpoint's mean
  learning rate normalised to sum 1 (``checkpoints.json``, written by
  :class:`~logix.integrations.huggingface.LogixCallback`);
* ``j`` runs over the validation *subtasks*; ``gbar_ij`` is the mean of subtask ``j``'s plain
  (SGD) projected gradients at checkpoint ``i`` (the run's ``queries`` store);
* ``Gamma_i(z) = m' / (sqrt(v') + eps)`` with ``m' = b1 m + (1 - b1) g`` and
  ``v' = b2 v + (1 - b2) g^2``: the step Adam would take on ``z``'s gradient ``g`` from the
  optimizer's moments ``m, v`` at the checkpoint, projected like the validation rows.

``variant="code"`` follows the authors' code instead of the paper: the mean over the subtask's
per-example cosines (``cos(g_v, Gamma)`` averaged over ``v``) instead of the cosine to the mean
gradient, and ``eps`` inside the square root (``m' / sqrt(v' + eps)``).

How the rows are made. The Adam transform is elementwise in full parameter space, so a train
example's gradient must exist unprojected before it: at each checkpoint the LoRA modules' full
per-example gradient blocks ``G`` (``d_out x d_in``, small for LoRA) are captured by the same
hooks as the log pass (in full space), ``Gamma`` is formed per example with the moments
(stored by parameter name in ``optimizer.safetensors`` next to the checkpoint), then projected
with the run's own projection ``P_out^T Gamma P_in`` -- the linear map the hooks apply to the
validation gradients -- so train and validation rows live in the same space. The projected
rows go to the ``train_adam`` store (``train_adam_code`` for the code variant) of the
checkpoint's run directory; scoring needs no model.

Losses: LESS (and the Trainer) uses the *mean* cross-entropy over an example's label tokens;
the Adam transform is not scale invariant (``g`` is combined with the moments of mean-reduced
batch losses), so the warm-up helper logs with :func:`~logix.contribution.less_rows.token_mean_loss`.

Modules: :mod:`logix.contribution.less_moments` (the moments by name, the Adam transform),
:mod:`logix.contribution.less_rows` (the projected Adam rows), :mod:`logix.contribution.less_warmup`
(what a checkpoint logs, the callback, the warm-up); this one scores (:func:`less_scores`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from logix.analysis import checkpoint_weights
from logix.contribution.less_moments import LessVariant, check_variant
from logix.contribution.less_rows import ADAM_STORES
from logix.core.progress import progress_bar
from logix.errors import ConfigError, RunDirectoryError, StatisticsError
from logix.store import Store
from logix.store.format import MANIFEST
from logix.store.rundir import (
    CHECKPOINTS_FILE,
    QUERY_STORE,
    checkpoints_file,
    less_file,
    store_dir,
    stores_dir,
)


@dataclass
class LessResult:
    """LESS scores of the candidate pool.

    Attributes:
        train_ids: candidate ids, in store order.
        scores: ``(n,)`` score of each candidate: the max over tasks of ``per_task``.
        best_task: the task reaching the max, per candidate.
        tasks: the validation subtasks, in ``per_task``'s column order.
        per_task: ``(n, n_tasks)``: ``sum_i w_i cos(...)`` per task.
        checkpoints: names of the checkpoints used; ``weights``: their weights.
        variant: ``paper`` or ``code``.
    """

    train_ids: list
    scores: Tensor
    best_task: list[str]
    tasks: list[str]
    per_task: Tensor
    checkpoints: list[str]
    weights: list[float]
    variant: str
    val_ids: dict[str, list] = field(default_factory=dict)

    def top(self, k: int) -> list:
        """Ids of the ``k`` highest-scoring candidates, best first."""
        order = torch.argsort(self.scores, descending=True, stable=True)[:k]
        return [self.train_ids[i] for i in order.tolist()]

    def records(self) -> list[dict[str, Any]]:
        """One dict per candidate: ``id``, ``score``, ``best_task`` and each task's score."""
        per_task = self.per_task.tolist()
        return [{"id": i, "score": float(s), "best_task": b, **{f"task:{t}": row[j] for j, t in enumerate(self.tasks)}}
                for i, s, b, row in zip(self.train_ids, self.scores.tolist(), self.best_task, per_task)]


def _entries(root: Path) -> list[dict]:
    index = checkpoints_file(root)
    if index.exists():
        entries = json.loads(index.read_text())["checkpoints"]
        if not entries:
            raise RunDirectoryError(f"{index} lists no logged checkpoint: train with the LESS callback first.")
        return entries
    if stores_dir(root).is_dir():  # a single run directory
        return [{"name": root.name, "dir": ".", "learning_rate": 1.0}]
    raise RunDirectoryError(
        f"{root} holds no checkpoints: neither {CHECKPOINTS_FILE} (a LogixCallback project directory) nor a "
        "run's stores/. Run warmup_and_log() (or the Trainer with less_callback(..., adam_rows=True)) first, "
        "and pass its project directory."
    )


def _tasks(root: Path, entries: list[dict], val_ids_by_task: Mapping[str, Sequence] | None,
           tasks: Sequence[str] | None) -> dict[str, list]:
    if val_ids_by_task is None:
        path = less_file(root)
        if path.exists():
            val_ids_by_task = json.loads(path.read_text())["tasks"]
        else:  # every validation row forms one task
            val_ids_by_task = {"all": _store(root / entries[-1]["dir"], QUERY_STORE, "validation").ids}
    val_ids_by_task = {str(t): list(v) for t, v in val_ids_by_task.items()}
    if tasks is not None:
        unknown = [t for t in tasks if t not in val_ids_by_task]
        if unknown:
            raise ConfigError(f"Unknown LESS tasks {unknown}. Tasks of this project: {sorted(val_ids_by_task)}.")
        val_ids_by_task = {t: val_ids_by_task[t] for t in tasks}
    if not val_ids_by_task:
        raise ConfigError("No validation task to score against: give val_ids_by_task={task: [ids]}.")
    empty = [t for t, v in val_ids_by_task.items() if not v]
    if empty:
        raise ConfigError(f"LESS tasks {empty} have no validation ids.")
    return val_ids_by_task


def _store(run_dir: Path, name: str, what: str) -> Store:
    path = store_dir(run_dir, name)
    if not (path / MANIFEST).exists():
        if name in ADAM_STORES.values():
            variant = next(v for v, s in ADAM_STORES.items() if s == name)
            fix = (f"log the checkpoints with less_callback(..., adam_rows=True) (or adam_rows=['{variant}']), "
                   "or use warmup_and_log()")
        elif name == QUERY_STORE:
            fix = "log the validation examples as the callback's queries=..."
        else:
            fix = "log the candidates as the callback's training examples"
        raise StatisticsError(f"Checkpoint {run_dir} has no {what} store {name!r}: {fix}.")
    return Store(path)


def _targets(val: Store, tasks: Mapping[str, list], variant: LessVariant) -> Tensor:
    """``(n_tasks, D)``: per task, the unit mean gradient (paper) or the mean unit gradient (code),
    so that ``unit(Gamma) @ target`` is the cosine to the mean / the mean of the cosines."""
    present = set(val.ids)
    rows = []
    for task, ids in tasks.items():
        missing = [i for i in ids if i not in present]
        if missing:
            raise ConfigError(
                f"Task {task!r}: validation ids {missing[:5]}{' ...' if len(missing) > 5 else ''} are not in "
                f"{val.directory} ({len(present)} validation rows). Log them as the callback's queries."
            )
        g = val.get(ids).to(torch.float64)
        if variant is LessVariant.PAPER:
            rows.append(F.normalize(g.mean(0), dim=0))
        else:
            rows.append(F.normalize(g, dim=1).mean(0))
    return torch.stack(rows)


def less_scores(
    checkpoints_root: str | Path,
    val_ids_by_task: Mapping[str, Sequence] | None = None,
    variant: str = LessVariant.PAPER,
    *,
    tasks: Sequence[str] | None = None,
    weighting: str = "lr",
    train_store: str | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
) -> LessResult:
    """LESS scores of every candidate logged under ``checkpoints_root``.

    Args:
        checkpoints_root: a project directory of :class:`LogixCallback` (``checkpoints.json``;
            its checkpoints hold the Adam stores and the validation rows as ``queries``), or one
            such run directory.
        val_ids_by_task: validation subtask -> ids of its rows in the ``queries`` store;
            default: the project's ``less.json`` (written by :func:`warmup_and_log`), else one task
            ``all`` of every validation row.
        variant: ``paper`` (cosine to the subtask's mean gradient; ``eps`` outside the sqrt) or
            ``code`` (mean of the per-example cosines; ``eps`` inside the sqrt).
        tasks: score against these subtasks only.
        weighting: checkpoint weights, ``lr`` (mean learning rate, normalised; LESS), ``uniform``, ``last``.
        train_store: score the rows of this store instead of the variant's Adam store; ``"train"``
            (the plain SGD gradients) gives the ablation without Adam preconditioning.
        chunk_rows: candidates scored per chunk (default: about 256 MB of float32 rows).
        progress: show a progress bar.

    Raises:
        RunDirectoryError: no checkpoints under ``checkpoints_root``.
        ConfigError: unknown variant or task, validation ids missing from the store.
        StatisticsError: a checkpoint lacks the Adam store of ``variant`` (logged without
            ``adam_rows``) or the validation store, or the checkpoints hold different candidates.
    """
    variant = check_variant(variant)
    root = Path(checkpoints_root)
    if not root.exists():
        raise RunDirectoryError(f"{root} does not exist: pass the project directory of a LESS warm-up run.")
    entries = _entries(root)
    weights = checkpoint_weights(entries, str(weighting))
    used = [(e, w) for e, w in zip(entries, weights) if w > 0]
    val_tasks = _tasks(root, entries, val_ids_by_task, tasks)
    train_ids: list | None = None
    index: dict | None = None
    per_task: Tensor | None = None
    candidates = train_store or ADAM_STORES[variant]
    stores = [(e, w, _store(root / e["dir"], candidates, "LESS Adam" if train_store is None else "candidate"),
               _store(root / e["dir"], QUERY_STORE, "validation")) for e, w in used]
    if chunk_rows is None:
        chunk_rows = min(65536, max(256, (256 << 20) // (4 * max(1, stores[0][2].dim))))
    total = sum(math.ceil(s.n_rows / chunk_rows) for _, _, s, _ in stores)
    bar = progress_bar(total=total, desc=f"LESS scores ({variant})", enabled=progress)
    for entry, weight, adam, val in stores:
        if adam.layout.to_json() != val.layout.to_json():
            raise StatisticsError(f"Checkpoint {entry['name']}: its Adam rows and validation rows have "
                                  "different layouts (logged with different projections).")
        ids = adam.ids
        if train_ids is None:
            train_ids, index = ids, None
            per_task = torch.zeros(len(ids), len(val_tasks), dtype=torch.float64)
        elif ids != train_ids:
            if set(ids) != set(train_ids) or len(ids) != len(train_ids):
                raise StatisticsError(
                    f"Checkpoint {entry['name']} holds Adam rows of other candidates than {used[0][0]['name']} "
                    f"({len(ids)} vs {len(train_ids)} rows): log the same pool at every checkpoint."
                )
            index = {i: k for k, i in enumerate(train_ids)}
        targets = _targets(val, val_tasks, variant).to(torch.float32)
        for chunk in adam.iter_chunks(chunk_rows):
            cos = (F.normalize(chunk.rows.to(torch.float32), dim=1) @ targets.T).to(torch.float64)
            if ids == train_ids:
                per_task[chunk.start: chunk.start + len(chunk.ids)] += weight * cos
            else:
                per_task[torch.tensor([index[i] for i in chunk.ids])] += weight * cos
            bar.update()
    bar.close()
    scores, best = per_task.max(dim=1)
    names = list(val_tasks)
    return LessResult(train_ids, scores, [names[b] for b in best.tolist()], names, per_task,
                      [e["name"] for e, _ in used], [w for _, w in used], variant, val_tasks)
