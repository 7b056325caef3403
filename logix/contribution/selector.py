"""Scoring a whole pool in linear time: a light model trained on the scores of a scored sample.

Contribution scores cost model passes per candidate (and per probe, for the in-context score),
so they are computed on a sample; a selector learns them and scores every pool item in one pass:

1. :func:`~logix.contribution.embeddings.embed_records` logs one embedding per record in a single forward pass of a frozen LM
   (mean of the last hidden states over the record's tokens, or the last token's), into a logix
   store when ``store_dir`` is given (crash-safe, resumable, readable without the model).
2. :class:`Selector` fits a small head (:mod:`logix.contribution.selector_heads`) on (embedding,
   score) pairs of the scored sample:
   ``ridge`` (closed form, L2 strength chosen by exact leave-one-out error), ``logistic``
   (binary label = top ``label_top_p`` of the sample by score) or ``mlp`` (one hidden layer,
   early-stopped on a validation split). :class:`~logix.contribution.lora_selector.LoraSelector`
   instead fine-tunes a LoRA
   sequence classifier on the records' text with the binary label, as in the original recipe.
3. :meth:`Selector.evaluate` reports the held-out Spearman correlation and AUC (of the top
   ``label_top_p`` by true score) of the selector's predictions; :func:`fit_selector` does 1-3 and
   predicts every pool item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from logix.config.choices import SelectorHead
from logix.contribution.selector_heads import head_for, registered_heads, standardize
from logix.contribution.selector_report import SelectorReport, holdout_report, take
from logix.errors import DataError

if TYPE_CHECKING:
    from logix.contribution.lora_selector import LoraSelector


class Selector:
    """A light head from embeddings to contribution scores (see the module docstring).

    Args:
        head: ``ridge`` | ``logistic`` | ``mlp`` (a :class:`SelectorHead` of the head registry).
        label_top_p: For ``logistic``: the fraction of the scored sample labelled 1 (top by score);
            also the positive class of :meth:`evaluate`'s AUC.
        alphas: Ridge strengths tried (relative to the mean squared singular value of the features).
        hidden: MLP hidden width.
        epochs: MLP / logistic training epochs (full batch).
        seed: Seed of the MLP's initialisation and validation split.
    """

    def __init__(self, head: SelectorHead | str = SelectorHead.RIDGE, *, label_top_p: float = 0.1,
                 alphas: Sequence[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100), hidden: int = 128, epochs: int = 300,
                 weight_decay: float = 1e-3, seed: int = 0) -> None:
        try:
            kind: SelectorHead | None = SelectorHead(head)
        except ValueError:
            kind = None
        if kind not in registered_heads():
            names = tuple(h.value for h in registered_heads())
            raise DataError(f"unknown selector head {head!r}; choose one of {names} (or LoraSelector)")
        if not 0 < label_top_p < 1:
            raise DataError(f"label_top_p must be in (0, 1), got {label_top_p!r}")
        self.head, self.label_top_p, self.alphas = kind, label_top_p, tuple(alphas)
        self.hidden, self.epochs, self.weight_decay, self.seed = hidden, epochs, weight_decay, seed
        self.fitted: dict[str, Any] | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> Selector:
        """Fit on embeddings ``x`` (n, d) and scores ``y`` (n,); NaN scores are ignored.

        Raises:
            DataError: Shapes disagree or fewer than 4 scored examples.
        """
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise DataError(f"embeddings {x.shape} and scores {y.shape} do not match")
        ok = ~np.isnan(y)
        x, y = x[ok], y[ok]
        if x.shape[0] < 4:
            raise DataError(f"a selector needs at least 4 scored examples, got {x.shape[0]}")
        mean, std = standardize(x)
        z = (x - mean) / std
        fitted: dict[str, Any] = {"mean": mean, "std": std}
        fitted.update(head_for(self.head).fit(self, z, y))
        self.fitted = fitted
        return self


    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted scores (ridge / mlp: on the scale of the training scores; logistic: log-odds of the top class)."""
        if self.fitted is None:
            raise DataError("fit the selector before predict()")
        z = (np.asarray(x, np.float64) - self.fitted["mean"]) / self.fitted["std"]
        return head_for(self.head).predict(self.fitted, z)

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, holdout: float = 0.2, seed: int | None = None) -> SelectorReport:
        """Fit on a random ``1 - holdout`` of the scored sample and report Spearman / AUC on the rest.

        The selector is left fitted on the training part; call :meth:`fit` on everything afterwards.
        """
        return holdout_report(self, x, y, holdout, self.seed if seed is None else seed, self.label_top_p)


@dataclass
class SelectorResult:
    """Predictions for every pool item and the selector's held-out report (:func:`fit_selector`).

    Attributes:
        ids: The pool items' ids.
        predictions: The predicted score of each item (ridge / mlp: on the scale of the sample's
            scores; logistic and LoRA: log-odds of the top class).
        report: The selector's quality on a held-out part of the scored sample.
    """

    ids: list
    predictions: np.ndarray
    report: SelectorReport


def fit_selector(
    selector: Selector | LoraSelector,
    ids: Sequence,
    features: np.ndarray | Sequence[Mapping[str, Any]],
    scores: Mapping[Any, float],
    *,
    holdout: float = 0.2,
) -> SelectorResult:
    """Evaluate on a held-out part of the scored sample, refit on all of it, predict every item.

    Args:
        selector: A :class:`Selector` (``features`` = embeddings aligned with ``ids``) or a
            :class:`LoraSelector` (``features`` = records aligned with ``ids``).
        ids: Every pool id.
        features: Embeddings or records of every pool item.
        scores: True scores of the scored sample, by id (ids not in the pool are an error).
        holdout: Fraction of the scored sample held out for the report.
    """
    where = {key: i for i, key in enumerate(ids)}
    unknown = [k for k in scores if k not in where]
    if unknown:
        raise DataError(f"{len(unknown)} scored id(s) are not in the pool, e.g. {unknown[0]!r}")
    rows = np.array([where[k] for k in scores], dtype=np.int64)
    y = np.array(list(scores.values()), dtype=np.float64)
    sample = take(features, rows)
    report = selector.evaluate(sample, y, holdout=holdout)
    selector.fit(sample, y)
    return SelectorResult(list(ids), np.asarray(selector.predict(features), np.float64), report)
