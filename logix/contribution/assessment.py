"""The assessment set: a stratified sample of a pool by category (the probes of the in-context score).

:func:`assessment_set` gives each category its share of ``size`` records (:class:`Allocation`),
drawn without replacement with ``numpy.random.default_rng(seed)``; the sample keeps pool order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from logix.config.choices import ChoiceEnum
from logix.data.template import field_of
from logix.errors import DataError


class Allocation(ChoiceEnum):
    """How :func:`assessment_set` shares ``size`` out among the categories."""

    PROPORTIONAL = "proportional"  # floor(size * n_c / N) each, the rest by largest remainder
    EQUAL = "equal"  # the same share each, capped by what a category holds (the surplus to the others)


def assessment_set(
    pool: Sequence[Mapping[str, Any]],
    size: int,
    category_key: str = "category",
    seed: int = 0,
    allocation: Allocation | Literal["proportional", "equal"] = Allocation.PROPORTIONAL,
) -> list[Mapping[str, Any]]:
    """Stratified sample of ``size`` records from ``pool`` by the value of ``category_key``.

    ``"proportional"`` gives each category ``floor(size * n_c / N)`` records and hands the rest out
    by largest remainder; ``"equal"`` gives every category the same share, capped by what it holds
    (the surplus goes to the others). Records are drawn without replacement with
    ``numpy.random.default_rng(seed)``, categories in sorted order; the sample keeps pool order.

    Args:
        pool: The records (e.g. ``load_pool(...).records``).
        size: How many records to draw, in ``1..len(pool)``.
        category_key: The record field holding the category.
        seed: Seed of the draw.
        allocation: ``proportional`` or ``equal`` shares per category.

    Returns:
        The sampled records (the probes of :func:`icl_contribution`), in pool order.

    Raises:
        DataError: ``size`` is not in ``1..len(pool)``, a record lacks the category, or an option is invalid.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(pool):
        raise DataError(f"size must be an integer in 1..{len(pool)} (the pool size), got {size!r}")
    try:
        allocation = Allocation(allocation)
    except ValueError:
        raise DataError(f"allocation must be 'proportional' or 'equal', got {allocation!r}") from None
    groups: dict[Any, list[int]] = {}
    for index, record in enumerate(pool):
        value = field_of(record, category_key, "category field")
        try:
            groups.setdefault(value, []).append(index)
        except TypeError:
            raise DataError(f"record {index}: category {value!r} is not hashable; use a str or int") from None
    cats = sorted(groups, key=lambda c: (str(type(c)), str(c)))
    counts = np.array([len(groups[c]) for c in cats])
    quotas = _proportional(counts, size) if allocation is Allocation.PROPORTIONAL else _equal(counts, size)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cat, quota in zip(cats, quotas):
        if quota:
            chosen.extend(int(i) for i in rng.choice(groups[cat], size=int(quota), replace=False))
    return [pool[i] for i in sorted(chosen)]


def _proportional(counts: np.ndarray, size: int) -> np.ndarray:
    exact = counts * size / counts.sum()
    quotas = np.floor(exact).astype(int)
    rest = size - quotas.sum()
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:rest]] += 1
    return quotas


def _equal(counts: np.ndarray, size: int) -> np.ndarray:
    quotas = np.zeros_like(counts)
    left = size
    while left > 0:
        open_ = np.flatnonzero(quotas < counts)
        share = max(left // len(open_), 1)
        for k in open_:
            take = min(share, counts[k] - quotas[k], left)
            quotas[k] += take
            left -= take
            if left == 0:
                break
    return quotas
