"""LESS, gradient side: the per-example loss and the projected Adam rows of a checkpoint.

The Adam transform is elementwise in full parameter space, so a train example's gradient must
exist unprojected before it: :class:`AdamRowWriter` captures the watched (LoRA) modules' full
per-example gradient blocks with the log pass's hooks, forms ``Gamma`` per example with the
checkpoint's moments (:mod:`logix.contribution.less_moments`), and projects it with the run's own
projection ``P_out^T Gamma P_in`` into the checkpoint's ``train_adam`` / ``train_adam_code``
store (:data:`ADAM_STORES`). :func:`log_adam_rows` does it in a pass of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from logix.capture.engine import BatchCapture
from logix.capture.run import Run
from logix.capture.spec import PassName, PassSpec, Space
from logix.config import IdPolicy
from logix.contribution.less_moments import VARIANTS, LessVariant, Moments, adam_transform, check_variant
from logix.core.dtypes import row_dtype
from logix.core.projection import ModuleProjection
from logix.errors import BatchError, ConfigError, StatisticsError
from logix.integrations.batches import example_id, loader_with_ids
from logix.integrations.loop import held_fixed, log_loader, watched_weights_trainable
from logix.integrations.losses import LossFn, sample_from_logits
from logix.store import Store
from logix.store.rundir import ADAM_CODE_STORE, ADAM_STORE, TRAIN_STORE, store_dir
from logix.store.runinfo import normalise_ids
from logix.store.sink import StoreSink, committed_ids

ADAM_STORES = {LessVariant.PAPER: ADAM_STORE, LessVariant.CODE: ADAM_CODE_STORE}
"""Store (in each checkpoint's run directory) of the Adam rows of each variant."""


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



@dataclass
class ModuleMoments:
    exp_avg: Tensor  # canonical (d_out, d_in_aug)
    exp_avg_sq: Tensor
    beta1: float
    beta2: float
    eps: float


def module_moments(model: nn.Module, run: Run, moments: Moments) -> dict[str, ModuleMoments]:
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
        out[w.name] = ModuleMoments(m.float(), v.float(), b1, b2, eps)
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
        self.variants = [check_variant(v) for v in variants]
        if not self.variants:
            raise ConfigError(f"Give at least one LESS variant of {[v.value for v in VARIANTS]}.")
        self.moments = module_moments(model, run, moments)
        self.full = {w.name: ModuleProjection(None, None) for w in run.watched}
        self.spec = PassSpec(PassName.ADAM, Space.FULL, covariance=False, gradients=True, gradient_stats=False)
        cfg = run.config.store
        self.sinks = {
            v: StoreSink(store_dir(run.dir, ADAM_STORES[v]), run.layout, cfg.dtype.value, False,
                         cfg.shard_rows, cfg.queue_shards, cfg.duplicate_ids)
            for v in self.variants
        }
        self._device_moments: dict[tuple, ModuleMoments] = {}

    def pending(self, ids: Sequence) -> list:
        """Ids some Adam store of this writer has not committed yet."""
        return [i for i in ids if any(i not in s.committed and i not in s.seen for s in self.sinks.values())]

    def __call__(self, data_id: Sequence | Tensor, mask: Tensor | None = None) -> AdamContext:
        return AdamContext(self, data_id, mask)

    def _moments_on(self, name: str, device: torch.device) -> ModuleMoments:
        key = (name, device)
        if key not in self._device_moments:
            mm = self.moments[name]
            self._device_moments[key] = ModuleMoments(mm.exp_avg.to(device), mm.exp_avg_sq.to(device),
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


class AdamContext:
    def __init__(self, writer: AdamRowWriter, data_id: Any, mask: Tensor | None) -> None:
        self.writer, self.data_id, self.mask = writer, data_id, mask
        self.capture: BatchCapture | None = None

    def __enter__(self) -> AdamContext:
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
                log_loader(writer, model, loader, loss_fn, "logix LESS adam rows", progress)
    finally:
        writer.close()
    return {v: Store(store_dir(run.dir, ADAM_STORES[v])) for v in writer.variants}



def adam_rows_complete(run_dir: str | Path, variant: str = LessVariant.PAPER) -> bool:
    """Whether a checkpoint's Adam store holds a row for every train-store id."""
    run_dir = Path(run_dir)
    adam, _ = committed_ids(store_dir(run_dir, ADAM_STORES[check_variant(variant)]))
    train, _ = committed_ids(store_dir(run_dir, TRAIN_STORE))
    return bool(train) and train <= adam
