"""Batching tokenized items into padded tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from logix.config.choices import ChoiceEnum
from logix.data.datasets import IGNORE_INDEX
from logix.errors import DataError

_PADDED = ("input_ids", "attention_mask", "labels")


class PaddingSide(ChoiceEnum):
    """Where :class:`PadCollator` puts the padding of a shorter item."""

    RIGHT = "right"  # after the tokens
    LEFT = "left"  # before them


@dataclass(frozen=True)
class PadCollator:
    """Pad a list of items (as produced by the logix datasets) into a batch of tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 (an item
    without one gets 1 on each of its tokens) and ``labels`` (when the items have them)
    with -100. ``id`` stays a Python list of the items' ids, which is what
    ``run(data_id=...)`` takes; other keys are dropped. Items without ``id``, as a Hugging
    Face ``Trainer`` passes them after removing the columns its model does not accept,
    give a batch without ``id``.

    Attributes:
        pad_token_id: The token id that fills ``input_ids``.
        padding_side: ``"right"`` (pad after the tokens) or ``"left"`` (before them).
        pad_to_multiple_of: Round the padded length up to a multiple of this, if given.
    """

    pad_token_id: int
    padding_side: PaddingSide | str = PaddingSide.RIGHT
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "padding_side", PaddingSide(self.padding_side))
        except (ValueError, TypeError):
            raise DataError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}") from None
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``items`` into ``{"input_ids", "attention_mask"[, "labels"][, "id"]}``.

        Raises:
            DataError: The batch is empty, an item lacks ``input_ids``, the items disagree on
                which keys they have, or an item's fields have different lengths.
        """
        if not items:
            raise DataError("cannot collate an empty batch")
        rows = [_columns(i, item) for i, item in enumerate(items)]
        keys = {k for k in _PADDED if k in rows[0]}
        if any({k for k in _PADDED if k in row} != keys for row in rows):
            raise DataError("the items of a batch disagree on which of input_ids/attention_mask/labels they have")
        width = self._width(max(len(row["input_ids"]) for row in rows))
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch: dict[str, Any] = {
            key: torch.tensor([self._pad(row[key], width, fill[key]) for row in rows], dtype=torch.long)
            for key in _PADDED if key in keys
        }
        present = ["id" in item for item in items]
        if all(present):
            batch["id"] = [item["id"] for item in items]
        elif any(present):
            raise DataError("some items of the batch have an 'id' and others do not")
        return batch

    def _width(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if multiple is None else -(-longest // multiple) * multiple

    def _pad(self, values: list[int], width: int, fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return values + padding if self.padding_side is PaddingSide.RIGHT else padding + values


def _columns(index: int, item: Mapping[str, Any]) -> dict[str, list[int]]:
    if "input_ids" not in item:
        raise DataError(f"item {index} of the batch has no 'input_ids' (its keys: {sorted(item)})")
    row = {key: _as_list(item[key]) for key in _PADDED if key in item}
    row.setdefault("attention_mask", [1] * len(row["input_ids"]))
    if any(len(v) != len(row["input_ids"]) for v in row.values()):
        raise DataError(f"item {index}: input_ids, attention_mask and labels differ in length")
    return row


def _as_list(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)
