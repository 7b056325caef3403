"""Batches of dataset items with their example ids, as the extraction loop reads them.

Ids come from the dataset's id column or a stable hash of the tokens (:class:`IdPolicy`), read
*before* the collator runs, so they survive collators that drop unknown keys. Under
``torch.distributed`` a loader holds its rank's contiguous share of the examples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from logix.config import IdPolicy
from logix.core.distributed import Dist, shard_indices
from logix.data import stable_id
from logix.errors import BatchError

# Inputs every HF model accepts under these names, besides its forward signature.
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")


def stable_token_id(token_ids: Sequence[int] | Tensor) -> str:
    """A stable hash id of an example's tokens (same tokens, same id, on every machine).

    Args:
        token_ids: The example's token ids.

    Returns:
        The id (:func:`logix.data.stable_id` of the ids).
    """
    if isinstance(token_ids, Tensor):
        token_ids = token_ids.tolist()
    return stable_id([int(t) for t in token_ids])


def example_id(item: Mapping[str, Any], policy: IdPolicy | str, id_field: str = "id") -> int | str:
    """The id of one dataset item under ``policy`` (``auto`` | ``column`` | ``hash``).

    Args:
        item: The dataset item.
        policy: ``column``: the item's ``id_field``; ``hash``: :func:`stable_token_id` of its
            ``input_ids``; ``auto``: the column when the item has it, else the hash.
        id_field: The name of the id column.

    Returns:
        The id, an int or a string.

    Raises:
        BatchError: The id column holds something else than ints or strings, ``column`` and the
            item has no id column, or the hash is needed and the item has no ``input_ids``.
    """
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

    With ``dist`` (a distributed run) the loader holds this rank's contiguous share only.

    Args:
        dataset: The dataset (a ``torch`` dataset or a sequence of items).
        collator: Collates items (without their id column) into a batch.
        model: The model: items keep only the keys its ``forward`` accepts (and ``input_ids``,
            ``attention_mask``, ``token_type_ids``, ``position_ids``, ``labels``).
        batch_size: Items per batch.
        ids: The id policy (:func:`example_id`).
        id_field: The name of the id column.
        limit: Keep the first ``limit`` items; 0: all.
        dist: This process's place in a distributed run, or None.

    Returns:
        A loader, in dataset order (no shuffling), of ``(ids, batch)`` pairs.
    """
    if limit and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    if dist is not None and dist.active:
        dataset = torch.utils.data.Subset(dataset, shard_indices(len(dataset), dist.rank, dist.world_size))
    collate = _IdCollate(collator, model_input_keys(model), IdPolicy.parse(ids, "ids"), id_field)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
