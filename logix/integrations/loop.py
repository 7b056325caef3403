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
import hashlib
import inspect
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from logix.capture.run import Pass, Run
from logix.config import IdPolicy
from logix.core.distributed import Dist, shard_indices, unwrap_model
from logix.errors import BatchError, ConfigError, RunDirectoryError
from logix.store import Store
from logix.store.format import write_json_atomic

MODEL_FILE = "model.json"  # the fingerprint of the model state a run directory was logged with
LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
# Inputs every HF model accepts under these names, besides its forward signature.
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")


def summed_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    sample_labels: bool = False,
    generator: torch.Generator | None = None,
    label_class: int | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Loss summed over the batch's examples and each example's label tokens.

    Causal LM (``labels`` shaped like ``input_ids``): next-token cross-entropy of
    ``logits[:, :-1]`` against ``labels[:, 1:]``, ``-100`` ignored. Classification
    (``labels`` of shape ``(batch,)``): cross-entropy of the logits. The model is called
    without ``labels`` so its own (mean) loss is never formed.

    Args:
        model: the model.
        batch: ``input_ids`` (and ``attention_mask`` ...) and ``labels``.
        sample_labels: replace every real label by one drawn from the model's own predictive
            distribution (same positions): the loss of a true-Fisher statistics pass
            (``Pass.sample_labels``).
        generator: random generator of the draws (on the model's device).
        label_class: classifiers only (``statistics.fisher: expected``): every example's label
            is this class and its loss is weighted by ``sqrt(C p_c)`` (``p`` detached, ``C`` the
            number of classes), so the mean over the ``C`` repeats of a pass (class ``0..C-1``)
            of any gradient second moment is exactly its expectation under the model's labels.
        num_classes: with ``label_class``, the classes the pass enumerates (``Pass.repeats``);
            checked against the logits.

    Raises:
        BatchError: the batch has no ``labels``; ``label_class`` with sequence labels, or with
            logits of another number of classes.
    """
    if "labels" not in batch:
        raise BatchError("summed_loss needs `labels` in the batch (use -100 for tokens without loss).")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)}
    logits = model(**inputs).logits.float()
    if label_class is not None:
        return expected_class_loss(logits, labels, label_class, num_classes)
    if labels.dim() == 1:
        if sample_labels:
            labels = sample_from_logits(logits, generator)
        return F.cross_entropy(logits, labels, reduction="sum")
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    if sample_labels:
        labels = torch.where(labels == -100, labels, sample_from_logits(logits, generator))
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def expected_class_loss(logits: Tensor, labels: Tensor, label_class: int, num_classes: int | None) -> Tensor:
    """``sum_n sqrt(C p_nc) CE(logits_n, c)`` with ``p`` detached: the loss of repeat ``c`` of an
    expected-Fisher pass (see :func:`summed_loss`). Its per-example gradient is
    ``sqrt(C p_c) g_c``, so averaging ``g g^T`` over ``c = 0..C-1`` gives ``sum_c p_c g_c g_c^T``,
    which for softmax cross-entropy is the Gauss-Newton matrix ``J^T (diag p - p p^T) J``."""
    classes = logits.shape[-1]
    if labels.dim() != 1 or logits.dim() != 2:
        raise BatchError(
            "statistics.fisher: expected needs one label per example (a classifier, labels of shape "
            f"(batch,)); got labels of shape {tuple(labels.shape)}. With several label tokens per example "
            "(a language model) the per-example gradient mixes every token's class and enumerating "
            "classes is not exact: use statistics.fisher: true with fisher_samples draws."
        )
    if num_classes is not None and num_classes != classes:
        raise BatchError(
            f"statistics.fisher_classes is {num_classes} but the model outputs {classes} classes: set "
            f"statistics.fisher_classes: {classes}."
        )
    if not 0 <= label_class < classes:
        raise BatchError(f"label_class {label_class} is outside the model's {classes} classes.")
    target = torch.full((logits.shape[0],), label_class, dtype=torch.long, device=logits.device)
    with torch.no_grad():
        weight = (classes * logits.softmax(-1)[:, label_class]).sqrt()
    return (weight * F.cross_entropy(logits, target, reduction="none")).sum()


def sample_from_logits(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One class per row of ``logits`` (n, classes), drawn from ``softmax(logits)``."""
    with torch.no_grad():
        probs = logits.detach().float().softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


def stable_token_id(token_ids: Sequence[int] | Tensor) -> str:
    """A stable hash id of an example's tokens (same tokens, same id, on every machine)."""
    from logix.data import stable_id

    if isinstance(token_ids, Tensor):
        token_ids = token_ids.tolist()
    return stable_id([int(t) for t in token_ids])


def example_id(item: Mapping[str, Any], policy: IdPolicy | str, id_field: str = "id") -> int | str:
    """The id of one dataset item under ``policy`` (``auto`` | ``column`` | ``hash``)."""
    policy = IdPolicy.parse(policy, "ids")
    if policy is not IdPolicy.HASH and id_field in item:
        value = item[id_field]
        if isinstance(value, Tensor):
            value = value.item()
        if isinstance(value, np.integer):
            value = int(value)
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise BatchError(f"Id column {id_field!r} must hold ints or strings, got {value!r}.")
        return value
    if policy is IdPolicy.COLUMN:
        raise BatchError(
            f"The dataset's items have no {id_field!r} column (keys: {sorted(item)}). Add one, set "
            "data.ids=hash, or, under a Trainer that dropped it (remove_unused_columns=True), pass "
            "the original dataset to LogixCallback(train_dataset=...)."
        )
    if "input_ids" not in item:
        raise BatchError(f"Cannot hash an id: the item has no input_ids (keys: {sorted(item)}).")
    return stable_token_id(item["input_ids"])


def model_input_keys(model: nn.Module) -> set[str]:
    """Batch keys the model's forward accepts (PEFT / wrapped models are looked through)."""
    base = model
    for attr in ("get_base_model", "module"):
        inner = getattr(base, attr, None)
        if callable(inner) and attr == "get_base_model":
            base = inner()
        elif isinstance(inner, nn.Module):
            base = inner
    params = inspect.signature(base.forward).parameters
    return set(params) | set(_MODEL_KEYS)


class _IdCollate:
    """Reads each item's id, strips keys the model does not take, then runs the collator."""

    def __init__(self, collator: Callable, keys: set[str], policy: IdPolicy, id_field: str) -> None:
        self.collator, self.keys, self.policy, self.id_field = collator, keys, policy, id_field

    def __call__(self, items: list[Mapping[str, Any]]) -> tuple[list, dict[str, Tensor]]:
        ids = [example_id(item, self.policy, self.id_field) for item in items]
        clean = [{k: v for k, v in item.items() if k in self.keys} for item in items]
        return ids, dict(self.collator(clean))


def loader_with_ids(
    dataset: Dataset | Sequence[Mapping[str, Any]],
    collator: Callable,
    model: nn.Module,
    batch_size: int,
    ids: IdPolicy | str = IdPolicy.AUTO,
    id_field: str = "id",
    limit: int = 0,
    dist: Dist | None = None,
) -> DataLoader:
    """A sequential loader of ``(ids, batch)``; ``limit`` keeps the first N items (0: all).

    With ``dist`` (a distributed run) the loader holds this rank's contiguous share only."""
    if limit and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    if dist is not None and dist.active:
        dataset = torch.utils.data.Subset(dataset, shard_indices(len(dataset), dist.rank, dist.world_size))
    collate = _IdCollate(collator, model_input_keys(model), IdPolicy.parse(ids, "ids"), id_field)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


@contextlib.contextmanager
def held_fixed(model: nn.Module) -> Iterator[None]:
    """Eval mode, parameter grads set aside and every RNG state saved; all restored on exit."""
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


def model_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A hash of the model's parameters (names, shapes and a strided sample of each one's values).

    Training moves (nearly) every weight, so two states of a model differ in their fingerprint;
    the sample keeps the cost negligible for large models.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        values = param.detach().flatten()
        values = values[:: max(1, values.numel() // sample)][:sample]
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(values.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def check_model_state(run: Run, model: nn.Module) -> None:
    """Record the model's fingerprint in the run directory, or check it against the recorded one.

    Raises:
        RunDirectoryError: the directory was logged with another model state, so resuming it
            would mix (or silently reuse) rows of two models.
    """
    path = run.dir / MODEL_FILE
    fingerprint = model_fingerprint(model)
    run.dist.on_main(lambda: _check_fingerprint(run, path, fingerprint))


def _check_fingerprint(run: Run, path, fingerprint: str) -> None:
    if not path.exists():
        write_json_atomic(path, {"fingerprint": fingerprint})
        return
    if json.loads(path.read_text())["fingerprint"] != fingerprint:
        raise RunDirectoryError(
            f"{run.dir} was logged with another state of the model (its weights differ), so its rows "
            "do not describe this model. Use another project name, or overwrite=True (--overwrite) "
            "to delete the old logs."
        )


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


def _log_loader(ctx_factory: Callable, model: nn.Module, loader: DataLoader, loss_fn: LossFn,
                desc: str, progress: bool, pass_: Pass | None = None, seed: int = 0,
                dist: Dist | None = None) -> None:
    sample_labels = pass_ is not None and pass_.sample_labels
    repeats = 1 if pass_ is None else pass_.repeats
    device = _device_of(model)
    generator = torch.Generator(device).manual_seed(seed) if sample_labels else None
    extra = 0
    if dist is not None and dist.active and needs_lockstep(model):
        extra = max(dist.all_gather_object(len(loader))) - len(loader)
    disable = not progress or (dist is not None and not dist.is_main)
    batches = ((r, b) for r in range(repeats) for b in loader)
    for repeat, (ids, batch) in tqdm(batches, total=repeats * len(loader), desc=desc, disable=disable,
                                     leave=False):
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
    check_model_state(run, model)
    dist = run.dist
    train = loader_with_ids(dataset, collator, model, batch_size, ids, id_field, limit, dist)
    with held_fixed(outer), watched_weights_trainable(run):
        if not run.finalized:
            for pass_ in run.plan():
                ctx = run if row_capture is None or not pass_.writes_rows else _together(run, row_capture)
                _log_loader(ctx, model, train, loss_fn, f"logix {pass_}", progress, pass_,
                            run.config.projection.seed + pass_.index + 7919 * dist.rank, dist)
            run.finalize()
        if queries is not None:  # committed query ids are skipped on a resumed run
            q_loader = loader_with_ids(queries, collator, model, batch_size, ids, id_field, dist=dist)
            _log_loader(run.log_queries, model, q_loader, loss_fn, "logix queries", progress, dist=dist)
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
