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
batch losses), so the warm-up helper logs with :func:`token_mean_loss`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from logix.analysis import CHECKPOINTS_FILE, checkpoint_weights
from logix.capture.engine import BatchCapture, PassSpec
from logix.capture.run import QUERY_STORE, Run
from logix.config import Config, IdPolicy, resolve_config
from logix.core.projection import ModuleProjection
from logix.errors import BatchError, ConfigError, RunDirectoryError, StatisticsError
from logix.integrations.loop import (
    LossFn,
    _log_loader,
    example_id,
    held_fixed,
    loader_with_ids,
    sample_from_logits,
    watched_weights_trainable,
)
from logix.store import Store
from logix.store.format import row_dtype, write_json_atomic
from logix.store.runinfo import normalise_ids
from logix.store.sink import StoreSink, committed_ids

MOMENTS_FILE = "optimizer.safetensors"
"""Adam moments of a checkpoint, keyed by parameter name (in the checkpoint's run directory)."""
LESS_FILE = "less.json"
"""Validation subtasks (task -> ids) and the warm-up subset of a LESS project directory."""
VARIANTS = ("paper", "code")
ADAM_STORES = {"paper": "train_adam", "code": "train_adam_code"}
"""Store (in each checkpoint's run directory) of the Adam rows of each variant."""
_META_KEY = "logix_moments"


# ---- the per-example loss ---------------------------------------------------------------------
def token_mean_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    sample_labels: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sum over the batch's examples of each example's *mean* loss over its label tokens.

    The per-example loss of LESS (and of the Trainer on a batch of one example); its gradient
    has the scale of the mean-reduced training loss the optimizer's moments were built from.
    Classification labels (shape ``(batch,)``): summed cross-entropy (one target per example).
    """
    if "labels" not in batch:
        raise BatchError("token_mean_loss needs `labels` in the batch (use -100 for tokens without loss).")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)}
    logits = model(**inputs).logits.float()
    if labels.dim() == 1:
        if sample_labels:
            labels = sample_from_logits(logits, generator)
        return F.cross_entropy(logits, labels, reduction="sum")
    logits, labels = logits[:, :-1], labels[:, 1:]
    if sample_labels:
        drawn = sample_from_logits(logits.flatten(0, 1), generator).view(labels.shape)
        labels = torch.where(labels == -100, labels, drawn)
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                reduction="none").view(labels.shape)
    count = (labels != -100).sum(1).clamp_min(1)
    return (per_token.sum(1) / count).sum()


# ---- optimizer moments --------------------------------------------------------------------------
@dataclass
class Moments:
    """Adam moments ``exp_avg`` (m) and ``exp_avg_sq`` (v) of each parameter, keyed by its name
    in ``model.named_parameters()``, with the step count and hyper-parameters of its group."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    step: dict[str, float]
    betas: dict[str, tuple[float, float]]
    eps: dict[str, float]
    optimizer: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.exp_avg)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def optimizer_moments(model: nn.Module, optimizer: Any) -> Moments:
    """The Adam moments of ``model``'s parameters, keyed by parameter name.

    The optimizer's own ``state_dict`` is keyed by position; here each parameter of the
    optimizer's param groups is matched, by identity, to its name in ``model.named_parameters()``.
    Tensors are copied to the CPU (the optimizer keeps updating its own in place).

    Raises:
        StatisticsError: no optimizer, an optimizer without Adam moments (``exp_avg`` /
            ``exp_avg_sq``, e.g. SGD), or one that has not taken a step yet.
    """
    if optimizer is None:
        raise StatisticsError(
            "No optimizer to read Adam moments from: LESS needs the Trainer's optimizer (the callback "
            "receives it at each checkpoint) or pass one to optimizer_moments(model, optimizer)."
        )
    opt = _unwrap_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = Moments({}, {}, {}, {}, {}, type(opt).__name__)
    for group in opt.param_groups:
        betas = group.get("betas")
        for p in group["params"]:
            state = opt.state.get(p, {})
            name = names.get(id(p))
            if name is None or "exp_avg" not in state or "exp_avg_sq" not in state:
                continue
            if betas is None:
                raise StatisticsError(f"Optimizer {type(opt).__name__} keeps exp_avg but has no betas.")
            moments.exp_avg[name] = state["exp_avg"].detach().to("cpu", torch.float32, copy=True)
            moments.exp_avg_sq[name] = state["exp_avg_sq"].detach().to("cpu", torch.float32, copy=True)
            moments.step[name] = float(state.get("step", 0))
            moments.betas[name] = (float(betas[0]), float(betas[1]))
            moments.eps[name] = float(group.get("eps", 1e-8))
    if not moments.exp_avg:
        raise StatisticsError(
            f"Optimizer {type(opt).__name__} holds no Adam moments (exp_avg / exp_avg_sq) for the model's "
            "parameters: LESS needs Adam or AdamW (the Trainer's default) after at least one step."
        )
    return moments


def save_moments(path: str | Path, moments: Moments) -> None:
    """Write ``moments`` to a safetensors file (atomically); hyper-parameters in its metadata."""
    path = Path(path)
    tensors = {}
    for name in moments.names:
        tensors[f"{name}::exp_avg"] = moments.exp_avg[name].contiguous()
        tensors[f"{name}::exp_avg_sq"] = moments.exp_avg_sq[name].contiguous()
    meta = {"optimizer": moments.optimizer,
            "params": {n: {"step": moments.step[n], "betas": list(moments.betas[n]), "eps": moments.eps[n]}
                       for n in moments.names}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)


def load_moments(path: str | Path) -> Moments:
    """Read moments written by :func:`save_moments`.

    Raises:
        StatisticsError: the file is missing (the checkpoint was logged without
            ``optimizer_states=True``) or is not a moments file.
    """
    path = Path(path)
    if not path.exists():
        raise StatisticsError(
            f"{path} is missing: this checkpoint was logged without the optimizer's Adam moments. Log it "
            "with LogixCallback(..., optimizer_states=True) (adam_rows=True implies it), or warmup_and_log()."
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get(_META_KEY)
    if meta is None:
        raise StatisticsError(f"{path} is not a logix optimizer-moments file (no {_META_KEY!r} metadata).")
    meta = json.loads(meta)
    tensors = load_file(str(path))
    params = meta["params"]
    return Moments(
        {n: tensors[f"{n}::exp_avg"] for n in params},
        {n: tensors[f"{n}::exp_avg_sq"] for n in params},
        {n: float(p["step"]) for n, p in params.items()},
        {n: (float(p["betas"][0]), float(p["betas"][1])) for n, p in params.items()},
        {n: float(p["eps"]) for n, p in params.items()},
        meta.get("optimizer", ""),
    )


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ConfigError(f"Unknown LESS variant {variant!r}. Choose between {list(VARIANTS)}.")
    return variant


def adam_transform(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float,
                   eps: float, variant: str = "paper") -> Tensor:
    """The Adam update direction of ``grad`` from the moments (no bias correction, as in LESS).

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``; ``paper``: ``m' / (sqrt(v') + eps)``,
    ``code``: ``m' / sqrt(v' + eps)``. ``grad`` may have leading batch dimensions.
    """
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad.square()
    if _check_variant(variant) == "paper":
        return m / (v.sqrt() + eps)
    return m / (v + eps).sqrt()


# ---- the Adam rows of a checkpoint --------------------------------------------------------------
@dataclass
class _ModuleMoments:
    exp_avg: Tensor  # canonical (d_out, d_in_aug)
    exp_avg_sq: Tensor
    beta1: float
    beta2: float
    eps: float


def module_moments(model: nn.Module, run: Run, moments: Moments) -> dict[str, _ModuleMoments]:
    """The moments of each watched module in the canonical ``(d_out, d_in [+ bias])`` layout.

    Raises:
        StatisticsError: a watched module's weights have no moments (they do not train; log
            only the modules that train, ``capture.trainable_only: true``), or its parameters
            use different Adam hyper-parameters.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for w in run.watched:
        params = [names.get(id(p), "?") for p in w.adapter.weights(w.module)]
        missing = [n for n in params if n not in moments.exp_avg]
        if missing:
            raise StatisticsError(
                f"Module {w.name!r}: the optimizer has no Adam moments for {missing}. LESS transforms the "
                "gradients of modules that train: log only those (capture.trainable_only: true, e.g. the "
                f"LoRA adapters). Parameters with moments: {moments.names[:6]}{' ...' if len(moments.names) > 6 else ''}."
            )
        hyper = {(moments.betas[n], moments.eps[n]) for n in params}
        if len(hyper) > 1:
            raise StatisticsError(f"Module {w.name!r}: its parameters use different Adam betas/eps {hyper}.")
        (b1, b2), eps = next(iter(hyper))
        m = w.adapter.param_grad_to_canonical(w.module, [moments.exp_avg[n] for n in params])
        v = w.adapter.param_grad_to_canonical(w.module, [moments.exp_avg_sq[n] for n in params])
        shape = (w.shape.d_out, w.shape.d_in_aug)
        if tuple(m.shape) != shape:
            raise StatisticsError(f"Module {w.name!r}: moments of shape {tuple(m.shape)}, expected {shape}.")
        out[w.name] = _ModuleMoments(m.float(), v.float(), b1, b2, eps)
    return out


def project_block(block: Tensor, projection: ModuleProjection) -> Tensor:
    """``P_out^T G P_in`` for a batch of full blocks ``(B, d_out, d_in_aug)`` (identity sides kept)."""
    if projection.p_out is not None:
        block = projection.p_out.to(block.device, block.dtype).T @ block
    if projection.p_in is not None:
        block = block @ projection.p_in.to(block.device, block.dtype)
    return block


class AdamRowWriter:
    """Writes the projected Adam rows of each batch to the run's Adam stores.

    Call it like a run, ``with writer(data_id=ids, mask=mask): loss.backward()``: the hooks
    capture the watched modules' full per-example gradient blocks, each is turned into
    ``Gamma`` per variant, projected with the run's projection and stored.
    """

    def __init__(self, run: Run, model: nn.Module, moments: Moments, variants: Sequence[str] = VARIANTS) -> None:
        if run.config.capture.per_token:
            raise ConfigError("LESS rows are per example: set capture.per_token: false for a LESS run.")
        if not run.watched:
            run.watch(model)
        self.run = run
        self.variants = [_check_variant(v) for v in variants]
        if not self.variants:
            raise ConfigError(f"Give at least one LESS variant of {list(VARIANTS)}.")
        self.moments = module_moments(model, run, moments)
        self.full = {w.name: ModuleProjection(None, None) for w in run.watched}
        self.spec = PassSpec("adam", "full", covariance=False, gradients=True, gradient_stats=False)
        cfg = run.config.store
        self.sinks = {
            v: StoreSink(run.dir / "stores" / ADAM_STORES[v], run.layout, cfg.dtype.value, False,
                         cfg.shard_rows, cfg.queue_shards, cfg.duplicate_ids)
            for v in self.variants
        }
        self._device_moments: dict[tuple, _ModuleMoments] = {}

    def pending(self, ids: Sequence) -> list:
        """Ids some Adam store of this writer has not committed yet."""
        return [i for i in ids if any(i not in s.committed and i not in s.seen for s in self.sinks.values())]

    def __call__(self, data_id: Sequence | Tensor, mask: Tensor | None = None) -> _AdamContext:
        return _AdamContext(self, data_id, mask)

    def _moments_on(self, name: str, device: torch.device) -> _ModuleMoments:
        key = (name, device)
        if key not in self._device_moments:
            mm = self.moments[name]
            self._device_moments[key] = _ModuleMoments(mm.exp_avg.to(device), mm.exp_avg_sq.to(device),
                                                       mm.beta1, mm.beta2, mm.eps)
        return self._device_moments[key]

    def rows(self, grads: Mapping[str, Tensor], variant: str) -> Tensor:
        """Projected Adam rows ``(B, layout.dim)`` of full gradient blocks ``{module: (B, d_out, d_in_aug)}``."""
        blocks = []
        for w in self.run.watched:
            g = grads[w.name].float()
            mm = self._moments_on(w.name, g.device)
            gamma = adam_transform(g, mm.exp_avg, mm.exp_avg_sq, mm.beta1, mm.beta2, mm.eps, variant)
            blocks.append(project_block(gamma, self.run.projections[w.name]).flatten(1))
        return torch.cat(blocks, dim=1)

    def close(self) -> None:
        errors = []
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception as exc:  # close every sink, then surface the first error
                errors.append(exc)
        if errors:
            raise errors[0]


class _AdamContext:
    def __init__(self, writer: AdamRowWriter, data_id: Any, mask: Tensor | None) -> None:
        self.writer, self.data_id, self.mask = writer, data_id, mask
        self.capture: BatchCapture | None = None

    def __enter__(self) -> _AdamContext:
        if self.data_id is None:
            raise BatchError("data_id is required while logging LESS rows: pass one id per example.")
        self.ids, id_type = normalise_ids(self.data_id)
        for sink in self.writer.sinks.values():
            sink.check_id_type(id_type)
        if not self.writer.pending(self.ids):
            return self
        mask = None if self.mask is None else self.mask.to(torch.bool)
        run = self.writer.run
        self.capture = BatchCapture(run.watched, self.writer.full, self.writer.spec, len(self.ids), mask,
                                    None, torch.float32)
        self.capture.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        capture, self.capture = self.capture, None
        if capture is None:
            return
        try:
            if exc_type is None:
                grads = {n: g.detach() for n, g in capture.finish().grads.items()}
                for variant, sink in self.writer.sinks.items():
                    keep = sink.keep_mask(self.ids)
                    if not keep.any():
                        continue
                    kept = [i for i, k in zip(self.ids, keep.tolist()) if k]
                    rows = self.writer.rows({n: g[keep.to(g.device)] for n, g in grads.items()}, variant)
                    store_dtype = row_dtype(self.writer.run.config.store.dtype.value)
                    sink.add(rows.to("cpu", store_dtype), kept, None, kept)
        finally:
            capture.detach()


def log_adam_rows(
    run: Run,
    model: nn.Module,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    collator: Callable,
    moments: Moments,
    *,
    variants: Sequence[str] = VARIANTS,
    batch_size: int = 8,
    ids: IdPolicy | str = IdPolicy.AUTO,
    id_field: str = "id",
    limit: int = 0,
    loss_fn: LossFn = token_mean_loss,
    progress: bool = True,
) -> dict[str, Store]:
    """Log the projected Adam rows of every example of ``dataset`` into ``run``'s Adam stores.

    ``run`` is a finalized checkpoint run of ``model`` (its projection is reused); examples an
    earlier, interrupted call committed are skipped. The model comes back exactly as it was.

    Returns:
        ``{variant: Store}`` of the ``train_adam`` (paper) / ``train_adam_code`` (code) stores.
    """
    writer = AdamRowWriter(run, model, moments, variants)
    try:
        loader = loader_with_ids(dataset, collator, model, batch_size, ids, id_field, limit)
        items = loader.dataset
        policy = IdPolicy.parse(ids, "ids")
        todo = [i for i in range(len(items)) if writer.pending([example_id(items[i], policy, id_field)])]
        if todo:
            if len(todo) < len(items):
                loader = loader_with_ids(torch.utils.data.Subset(items, todo), collator, model, batch_size,
                                         ids, id_field)
            with held_fixed(model), watched_weights_trainable(run):
                _log_loader(writer, model, loader, loss_fn, "logix LESS adam rows", progress)
    finally:
        writer.close()
    return {v: Store(run.dir / "stores" / ADAM_STORES[v]) for v in writer.variants}


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
    from logix.integrations.loop import extract

    if run.dist.active:
        from logix.errors import DistributedError

        raise DistributedError(
            "LESS rows (optimizer_states / adam_rows) are logged by one process: the optimizer's moments "
            "are per-rank state (sharded under FSDP). Log the LESS checkpoints without torchrun / "
            "accelerate launch, or leave optimizer_states and adam_rows off under several processes."
        )
    moments = optimizer_moments(model, optimizer)
    if not adam_rows:
        store = extract(run, model, dataset, collator, **kwargs)
        save_moments(run.dir / MOMENTS_FILE, moments)  # after extract checked the model state
        return store
    variants = VARIANTS if adam_rows is True else tuple(adam_rows)
    for v in variants:
        _check_variant(v)
    writer: AdamRowWriter | None = None

    def capture(data_id: Any = None, mask: Tensor | None = None) -> _AdamContext:
        nonlocal writer
        if writer is None:  # built once the run is watched (and a PCA projection exists)
            writer = AdamRowWriter(run, model, moments, variants)
        return writer(data_id, mask)

    try:
        store = extract(run, model, dataset, collator, row_capture=capture, **kwargs)
    finally:
        if writer is not None:
            writer.close()
    save_moments(run.dir / MOMENTS_FILE, moments)  # after extract checked the model state
    rows_kwargs = {k: kwargs[k] for k in ("batch_size", "ids", "id_field", "limit", "loss_fn", "progress") if k in kwargs}
    log_adam_rows(run, model, dataset, collator, moments, variants=variants, **rows_kwargs)
    return store


# ---- scoring ------------------------------------------------------------------------------------
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
    index = root / CHECKPOINTS_FILE
    if index.exists():
        entries = json.loads(index.read_text())["checkpoints"]
        if not entries:
            raise RunDirectoryError(f"{index} lists no logged checkpoint: train with the LESS callback first.")
        return entries
    if (root / "stores").is_dir():  # a single run directory
        return [{"name": root.name, "dir": ".", "learning_rate": 1.0}]
    raise RunDirectoryError(
        f"{root} holds no checkpoints: neither {CHECKPOINTS_FILE} (a LogixCallback project directory) nor a "
        "run's stores/. Run warmup_and_log() (or the Trainer with LogixCallback(..., adam_rows=True)) first, "
        "and pass its project directory."
    )


def _tasks(root: Path, entries: list[dict], val_ids_by_task: Mapping[str, Sequence] | None,
           tasks: Sequence[str] | None) -> dict[str, list]:
    if val_ids_by_task is None:
        less_file = root / LESS_FILE
        if less_file.exists():
            val_ids_by_task = json.loads(less_file.read_text())["tasks"]
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
    path = run_dir / "stores" / name
    if not (path / "manifest.json").exists():
        if name in ADAM_STORES.values():
            variant = next(v for v, s in ADAM_STORES.items() if s == name)
            fix = (f"log the checkpoints with LogixCallback(..., adam_rows=True) (or adam_rows=['{variant}']), "
                   "or use warmup_and_log()")
        elif name == QUERY_STORE:
            fix = "log the validation examples as the callback's queries=..."
        else:
            fix = "log the candidates as the callback's training examples"
        raise StatisticsError(f"Checkpoint {run_dir} has no {what} store {name!r}: {fix}.")
    return Store(path)


def _targets(val: Store, tasks: Mapping[str, list], variant: str) -> Tensor:
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
        if variant == "paper":
            rows.append(F.normalize(g.mean(0), dim=0))
        else:
            rows.append(F.normalize(g, dim=1).mean(0))
    return torch.stack(rows)


def less_scores(
    checkpoints_root: str | Path,
    val_ids_by_task: Mapping[str, Sequence] | None = None,
    variant: str = "paper",
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
    _check_variant(variant)
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
    bar = tqdm(total=total, desc=f"LESS scores ({variant})", disable=not progress, leave=False)
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


# ---- warm-up training and logging ---------------------------------------------------------------
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
    project: str = "less",
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

    from logix.integrations.huggingface import LogixCallback

    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}.")
    if not validation:
        raise ConfigError("validation must map at least one subtask name to its examples.")
    for v in variants:
        _check_variant(v)
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
    callback = LogixCallback(cfg, project=project, train_dataset=pool, queries=val_items, data_collator=collator,
                             loss_fn=token_mean_loss, overwrite=overwrite, progress=progress,
                             optimizer_states=True, adam_rows=tuple(variants))
    defaults = dict(
        output_dir=str(project_dir / "trainer_output"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0.03, weight_decay=0.0, seed=seed,
        save_strategy="no", report_to=[], logging_strategy="epoch" if progress else "no", disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )
    defaults.update(training_args or {})
    trainer = Trainer(model=model, args=TrainingArguments(**defaults), train_dataset=warm,
                      data_collator=collator, callbacks=[callback])
    trainer.train()
    write_json_atomic(project_dir / LESS_FILE, {"tasks": tasks, "warmup_ids": warmup_ids, "fraction": fraction,
                                                "variants": list(variants), "seed": seed})
    return Warmup(project_dir, trainer, warmup_ids, tasks)


def adam_rows_complete(run_dir: str | Path, variant: str = "paper") -> bool:
    """Whether a checkpoint's Adam store holds a row for every train-store id."""
    run_dir = Path(run_dir)
    adam, _ = committed_ids(run_dir / "stores" / ADAM_STORES[_check_variant(variant)])
    train, _ = committed_ids(run_dir / "stores" / "train")
    return bool(train) and train <= adam


__all__ = [
    "ADAM_STORES",
    "AdamRowWriter",
    "LESS_FILE",
    "LessResult",
    "MOMENTS_FILE",
    "Moments",
    "VARIANTS",
    "Warmup",
    "adam_rows_complete",
    "adam_transform",
    "less_config",
    "less_scores",
    "load_moments",
    "log_adam_rows",
    "less_extract",
    "module_moments",
    "optimizer_moments",
    "project_block",
    "save_moments",
    "token_mean_loss",
    "warmup_and_log",
]
