"""Extraction: log every example of a dataset with a model held fixed.

This is the loop a user would write around ``with run(...)``, packaged for datasets of
dict items (``input_ids``, ``attention_mask``, ``labels`` and an optional id column), as the
Trainer callback and ``logix extract`` use it:

* ids come from the dataset's id column or a stable hash of the tokens (:class:`IdPolicy`),
  read *before* the collator runs, so they survive collators that drop unknown keys;
* the loss is the per-example **sum** of the next-token cross-entropy over the label tokens
  (``-100`` ignored), whatever reduction the model or the Trainer would use;
* the model is left exactly as it was: train/eval mode, parameter ``.grad`` tensors and the
  RNG states are restored when extraction ends (also on errors);
* under ``torch.distributed`` each rank logs its own contiguous share of the examples (every
  example on exactly one rank, no padding) through the model inside any DDP wrapper, so no
  gradient all-reduce runs and ranks may log different numbers of batches. A model sharded by
  FSDP needs every rank in each forward: ranks with fewer batches then run extra, unlogged ones.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from logix.capture.run import Pass, Run
from logix.config import IdPolicy
from logix.core.distributed import Dist, unwrap_model
from logix.core.progress import progress_bar
from logix.errors import BatchError, ConfigError
from logix.integrations.batches import loader_with_ids
from logix.integrations.losses import LossFn, summed_loss
from logix.store import Store


@contextlib.contextmanager
def held_fixed(model: nn.Module) -> Iterator[None]:
    """Eval mode, parameter grads set aside and every RNG state saved; all restored on exit.

    A context manager: inside it the model is in eval mode with no parameter gradients (and
    gradients enabled), so a logging pass leaves training exactly as it was.

    Args:
        model: The model.
    """
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in model.parameters()}
    rng = _rng_state()
    try:
        model.eval()
        for p in grads:
            p.grad = None
        with torch.enable_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for p, g in grads.items():
            p.grad = g
        _set_rng_state(rng)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def watched_weights_trainable(run: Run) -> Iterator[None]:
    """Let gradients reach frozen watched modules (e.g. a LoRA model's base layers chosen with
    ``capture.trainable_only: false``); their ``requires_grad`` flags are restored on exit."""
    frozen = [p for w in run.watched for p in w.adapter.weights(w.module) if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def needs_lockstep(model: nn.Module) -> bool:
    """Whether every rank must run each forward together (FSDP shards the parameters)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)
    except ImportError:
        FSDPModule = FullyShardedDataParallel  # noqa: N806  (an older torch: FSDP1 only)
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def log_loader(ctx_factory: Callable, model: nn.Module, loader: DataLoader, loss_fn: LossFn,
               desc: str, progress: bool, pass_: Pass | None = None, seed: int = 0,
               dist: Dist | None = None) -> None:
    """Run ``loss_fn`` forward / backward on every batch of ``loader`` (``repeats`` times for
    ``pass_``) inside ``ctx_factory(data_id=, mask=)``, so the context logs each batch."""
    sample_labels = pass_ is not None and pass_.sample_labels
    repeats = 1 if pass_ is None else pass_.repeats
    device = _device_of(model)
    generator = torch.Generator(device).manual_seed(seed) if sample_labels else None
    extra = 0
    if dist is not None and dist.active and needs_lockstep(model):
        extra = max(dist.all_gather_object(len(loader))) - len(loader)
    disable = not progress or (dist is not None and not dist.is_main)
    batches = ((r, b) for r in range(repeats) for b in loader)
    for repeat, (ids, batch) in progress_bar(batches, total=repeats * len(loader), desc=desc, enabled=not disable,
                                             unit="batch"):
        kwargs = pass_.loss_kwargs(repeat, generator) if pass_ is not None else {}
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with ctx_factory(data_id=ids, mask=batch.get("attention_mask")):
            try:
                loss = loss_fn(model, batch, **kwargs)
            except TypeError as exc:
                if not kwargs:
                    raise
                raise ConfigError(
                    f"statistics.fisher=true / expected needs a loss_fn accepting {sorted(kwargs)} "
                    f"(as logix.integrations.summed_loss does): {exc}"
                ) from None
            if not loss.requires_grad:
                raise ConfigError(
                    "The loss does not require grad: no parameter of the model is trainable. Unfreeze "
                    "the modules to log (requires_grad=True), e.g. the LoRA adapters."
                )
            loss.backward()
        model.zero_grad(set_to_none=True)
    _lockstep_padding(model, loader, loss_fn, repeats * extra, device)


def _lockstep_padding(model: nn.Module, loader: DataLoader, loss_fn: LossFn, count: int, device) -> None:
    """Forward / backward passes that log nothing, so that a rank with fewer batches joins its
    sharded model's collectives as often as the others."""
    if count <= 0:
        return
    try:
        _, batch = next(iter(loader))
    except StopIteration:
        raise BatchError(
            "This rank has no example to log but the model is FSDP-sharded, so it must still run "
            "forwards with the other ranks: log at least as many examples as there are ranks."
        ) from None
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    for _ in range(count):
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)


def extract(
    run: Run,
    model: nn.Module,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    collator: Callable,
    *,
    queries: Dataset | Sequence[Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    ids: IdPolicy | str = IdPolicy.AUTO,
    id_field: str = "id",
    limit: int = 0,
    loss_fn: LossFn = summed_loss,
    progress: bool = True,
    row_capture: Callable | None = None,
) -> Store:
    """Log every example of ``dataset`` (and ``queries``) with ``model`` held fixed.

    Runs every pass of the run's plan (PCA covariance, KFAC eigenbasis, log), finalizes the
    run, then logs ``queries`` into its ``queries`` store. A run interrupted earlier resumes:
    committed ids are skipped; a directory logged with another model state is an error (its
    fingerprint is recorded in ``model.json``). The model comes back exactly as it was (see :func:`held_fixed`);
    watched modules whose weights are frozen get gradients while logging and are frozen again
    after (:func:`watched_weights_trainable`).

    Args:
        run: the run to log into; ``run.watch(model)`` is called when nothing is watched yet.
        model: the model, on its device.
        dataset: items with ``input_ids`` (``attention_mask``, ``labels``, id column optional).
        collator: turns a list of items (id column removed) into a batch of tensors.
        queries: examples whose influence will be explained, logged with the same projection.
        batch_size: examples per batch.
        ids: ``auto`` | ``column`` | ``hash``; see :class:`logix.config.IdPolicy`.
        id_field: name of the id column.
        limit: log only the first N training examples (0: all).
        loss_fn: per-example summed loss of a batch (default :func:`summed_loss`); with
            ``statistics.fisher: true`` it is called with ``sample_labels=True, generator=...``
            (``fisher: expected``: ``label_class=c, num_classes=C``) in the statistics passes.
        progress: show progress bars.
        row_capture: a context factory ``(data_id=, mask=)`` entered with the run's own around
            each batch of the pass that writes the train rows, so one forward / backward feeds
            both (LESS's Adam rows, :func:`logix.contribution.less.less_extract`).

    Returns:
        The run's train store.
    """
    outer = model
    model = unwrap_model(model)  # DDP: log through the inner model (no gradient all-reduce)
    if not run.watched:
        run.watch(model)
    run.check_model(model)
    dist = run.dist
    train = loader_with_ids(dataset, collator, model, batch_size, ids, id_field, limit, dist)
    with held_fixed(outer), watched_weights_trainable(run):
        if not run.finalized:
            for pass_ in run.plan():
                ctx = run if row_capture is None or not pass_.writes_rows else _together(run, row_capture)
                log_loader(ctx, model, train, loss_fn, f"logix {pass_}", progress, pass_,
                            run.config.projection.seed + pass_.index + 7919 * dist.rank, dist)
            run.finalize()
        if queries is not None:  # committed query ids are skipped on a resumed run
            q_loader = loader_with_ids(queries, collator, model, batch_size, ids, id_field, dist=dist)
            log_loader(run.log_queries, model, q_loader, loss_fn, "logix queries", progress, dist=dist)
            run.finalize()
    return run.store()


def _together(*factories: Callable) -> Callable:
    """A context factory entering every one of ``factories`` with the same ``data_id`` and ``mask``."""

    @contextlib.contextmanager
    def both(data_id: Any = None, mask: Tensor | None = None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for factory in factories:
                stack.enter_context(factory(data_id=data_id, mask=mask))
            yield

    return both
