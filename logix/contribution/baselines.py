"""Model-free baselines every selection is compared with: response length and random.

* ``length``: the response's length, in tokens when a tokenizer is given, else in characters.
  Selecting the longest responses is a strong, cheap baseline for instruction tuning.
* ``random``: seeded uniform scores; a top-p% selection by it is a uniform random subset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from logix.data import PromptTemplate
from logix.data.template import field_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def response_length(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: PromptTemplate | None = None,
) -> np.ndarray:
    """Length of each record's response: tokens with ``tokenizer``, characters without.

    Args:
        records: The records.
        tokenizer: Count tokens with it; None counts characters.
        template: The prompt template (Alpaca by default): characters of its output field, or
            tokens of its formatted response.

    Returns:
        ``(n,)`` lengths, a baseline score (longer responses first).

    Raises:
        DataError: A record lacks the output field, or it is not a string.
    """
    template = template or PromptTemplate()
    texts = [template.response(r) for r in records]
    if tokenizer is None:
        return np.array([len(field_of(r, template.output_field)) for r in records], dtype=np.float64)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([len(ids) for ids in encoded], dtype=np.float64)


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded uniform scores in [0, 1) (the same for the same ``n`` and ``seed``).

    Args:
        n: How many scores.
        seed: Seed of the draw.

    Returns:
        ``(n,)`` scores: the random baseline every report shows beside the chosen score.
    """
    return np.random.default_rng(seed).random(n)
