"""Judging attribution quality: the linear datamodeling score (LDS) and top-k removal tests.

LDS (Park et al., TRAK): retrain on many random subsets ``S_s`` of the train set, measure the
query outputs ``f_q(S_s)``, predict them with the attribution scores as
``sum_{i in S_s} score(q, i)``, and report the Spearman rank correlation between prediction
and measurement over subsets, averaged over queries. Use a measurement whose *decrease* the
scores predict (e.g. the negated query loss, or the correct-class margin): positive influence
means "this train example helps the query", so more proponents in ``S_s`` means a higher output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

TrainFn = Callable[[np.ndarray], np.ndarray]  # bool mask over train examples -> (n_query,) outputs


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks, 0-based (ties share their mean rank), along the first axis.

    ``scipy.stats.rankdata(x, axis=0) - 1``; a column holding NaN is all NaN.
    """
    from scipy.stats import rankdata as scipy_rankdata  # scipy loads on first use

    return scipy_rankdata(np.asarray(x, np.float64), axis=0) - 1.0


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of the columns of ``a`` and ``b`` (shape (n, m) -> (m,)).

    Column ``j`` is ``scipy.stats.spearmanr(a[:, j], b[:, j]).statistic`` (ties share their mean
    rank), computed for every column at once: average ranks along the first axis, then a
    vectorised Pearson correlation (``spearmanr`` on two matrices would correlate every column
    with every other). NaN where a column is constant or holds NaN.

    Args:
        a: ``(n, m)`` values.
        b: ``(n, m)`` values.

    Returns:
        ``(m,)`` correlations.

    Raises:
        ValueError: ``a`` and ``b`` differ in shape.
    """
    from scipy.stats import rankdata as scipy_rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two arrays of one shape, got {a.shape} and {b.shape}")
    ra, rb = scipy_rankdata(a, axis=0), scipy_rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(0) / denom, np.nan)


@dataclass
class LDSResult:
    """The linear datamodeling score (LDS) of a score matrix, as :func:`lds` returns it.

    Attributes:
        per_query: ``(n_query,)`` Spearman correlation, per query, of the predicted outputs of the
            subsets with the measured ones (NaN where either is constant).
        mean: The mean of ``per_query`` over the queries, NaN ignored: the LDS.
        predicted: ``(n_subsets, n_query)`` predicted outputs, each subset's summed scores.
    """

    per_query: np.ndarray  # (n_query,) Spearman correlations
    mean: float
    predicted: np.ndarray  # (n_subsets, n_query)


def lds(scores: np.ndarray | torch.Tensor, masks: np.ndarray, outputs: np.ndarray) -> LDSResult:
    """The linear datamodeling score (LDS) of a score matrix.

    Each subset's predicted output for a query is the sum of the query's scores over the subset;
    the LDS of a query is the Spearman correlation, over the subsets, of prediction and measurement.

    Args:
        scores: ``(n_query, n_train)`` attribution scores (e.g. ``InfluenceResult.scores``).
        masks: ``(n_subsets, n_train)`` boolean subsets (:func:`subset_masks`).
        outputs: ``(n_subsets, n_query)`` measured outputs of the models retrained on those subsets
            (:func:`retrain_on_subsets`).

    Returns:
        The per-query correlations, their mean and the predictions.

    Raises:
        ValueError: The shapes of the three arrays disagree.
    """
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    outputs = np.asarray(outputs, np.float64)
    if masks.shape[1] != scores.shape[1] or outputs.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"Shapes disagree: scores {scores.shape} (n_query, n_train), masks {masks.shape} "
            f"(n_subsets, n_train), outputs {outputs.shape} (n_subsets, n_query)."
        )
    predicted = masks @ scores.T
    per_query = spearman(predicted, outputs)
    return LDSResult(per_query, float(np.nanmean(per_query)), predicted)


def subset_masks(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``n_subsets`` random subsets, each of ``round(fraction * n_train)`` examples.

    Args:
        n_train: The size of the train set.
        n_subsets: How many subsets.
        fraction: The share of the train set in each subset.
        seed: Seed of the draw (the same arguments give the same subsets).

    Returns:
        ``(n_subsets, n_train)`` boolean masks.
    """
    rng = np.random.default_rng(seed)
    size = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size, replace=False)] = True
    return masks


def retrain_on_subsets(
    train_fn: TrainFn,
    n_train: int,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    cache: str | Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Retrain with ``train_fn(mask)`` on random subsets: the ground truth of :func:`lds`.

    Args:
        train_fn: Trains a model on the examples a boolean mask over the train set selects and
            returns the ``(n_query,)`` outputs that model gives the queries.
        n_train: The size of the train set.
        n_subsets: How many subsets (and retrainings).
        fraction: The share of the train set in each subset.
        seed: Seed of the subsets (:func:`subset_masks`).
        cache: An ``.npz`` path: finished subsets are saved after each retraining, and a later
            call with the same arguments resumes from them (ground truth is expensive).
        progress: Show a progress bar.

    Returns:
        ``(masks, outputs)``: ``(n_subsets, n_train)`` booleans and ``(n_subsets, n_query)`` outputs.
    """
    masks = subset_masks(n_train, n_subsets, fraction, seed)
    outputs: list[np.ndarray] = []
    path = None if cache is None else Path(cache)
    if path is not None and path.exists():
        data = np.load(path, allow_pickle=False)
        if data["masks"].shape == masks.shape and np.array_equal(data["masks"], masks):
            outputs = list(data["outputs"])
    for s in tqdm(range(len(outputs), n_subsets), desc="retraining", disable=not progress):
        outputs.append(np.asarray(train_fn(masks[s]), np.float64))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, masks=masks, outputs=np.stack(outputs))
    return masks, np.stack(outputs)


def topk_removal_test(
    scores: np.ndarray | torch.Tensor,
    train_fn: TrainFn,
    query: int,
    ks: tuple[int, ...] = (10, 20),
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Brittleness test for one query: remove its top-k proponents (and k random examples),
    retrain, and report the change of the query's output against the full-data model.

    Args:
        scores: ``(n_query, n_train)`` attribution scores.
        train_fn: Trains a model on the examples a boolean mask over the train set selects and
            returns the ``(n_query,)`` outputs that model gives the queries.
        query: The query's row in ``scores``.
        ks: The numbers of examples removed, one retraining pair each.
        seed: Seed of the random removals.

    Returns:
        Per ``k``: ``top_k_removed`` and ``random_removed``, the change of the query's output
        (retrained minus full data). With outputs whose decrease the scores predict, removing
        true proponents lowers the output more than removing random examples.
    """
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, np.float64)
    n_train = scores.shape[1]
    full = np.ones(n_train, dtype=bool)
    base = float(np.asarray(train_fn(full))[query])
    rng = np.random.default_rng(seed)
    order = np.argsort(-scores[query])
    out = {}
    for k in ks:
        top_mask, rand_mask = full.copy(), full.copy()
        top_mask[order[:k]] = False
        rand_mask[rng.choice(n_train, k, replace=False)] = False
        out[k] = {
            "top_k_removed": float(np.asarray(train_fn(top_mask))[query]) - base,
            "random_removed": float(np.asarray(train_fn(rand_mask))[query]) - base,
        }
    return out
