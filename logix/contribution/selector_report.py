"""How well a selector scores held-out examples: Spearman with the true scores and AUC of their top.

:func:`holdout_report` fits a selector (anything with ``fit`` / ``predict``) on a random part of a
scored sample and reports on the rest; :func:`top_labels` is the binary label of the logistic and
LoRA selectors and the positive class of :func:`auc`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from logix.analysis.evaluate import spearman
from logix.errors import DataError


def top_labels(y: np.ndarray, top_p: float) -> np.ndarray:
    """1 for the top ``top_p`` fraction of ``y`` (at least one), else 0."""
    n = max(1, int(math.ceil(top_p * y.shape[0])))
    labels = np.zeros(y.shape[0], dtype=np.float64)
    labels[np.argsort(-y, kind="stable")[:n]] = 1.0
    return labels


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half); NaN if one class.

    ``sklearn.metrics.roc_auc_score``, which raises where one class is missing.

    Args:
        scores: Predicted scores.
        labels: 0/1 labels, one per score.

    Returns:
        The AUC in [0, 1]; NaN when ``labels`` hold one class only.
    """
    from sklearn.metrics import roc_auc_score  # scikit-learn loads on first use

    labels = np.asarray(labels).astype(bool).reshape(-1)
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, np.float64).reshape(-1)))


@dataclass
class SelectorReport:
    """Held-out quality of a selector: Spearman with the true scores and AUC of their top fraction.

    Attributes:
        spearman: Spearman correlation of the predictions with the true scores on the held-out part.
        auc: AUC of the predictions for the held-out part's top fraction (the labels it learns).
        n_train: Scored examples it was fitted on.
        n_holdout: Scored examples held out.
        head: The head (``ridge``, ``logistic``, ``mlp``, ``lora``).
    """

    spearman: float
    auc: float
    n_train: int
    n_holdout: int
    head: str

    def as_dict(self) -> dict[str, Any]:
        return {"spearman": self.spearman, "auc": self.auc, "n_train": self.n_train,
                "n_holdout": self.n_holdout, "head": self.head}


def holdout_report(model: Any, x: Any, y: np.ndarray, holdout: float, seed: int, top_p: float) -> SelectorReport:
    """Fit ``model`` on a random ``1 - holdout`` of the scored sample ``(x, y)`` and report on the rest."""
    y = np.asarray(y, np.float64).reshape(-1)
    if not 0 < holdout < 1:
        raise DataError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    scored = np.flatnonzero(~np.isnan(y))
    perm = np.random.default_rng(seed).permutation(scored)
    n_hold = max(2, int(round(holdout * perm.size)))
    if perm.size - n_hold < 4:
        raise DataError(f"{perm.size} scored examples are too few to hold {holdout:.0%} out; score more")
    test, train = perm[:n_hold], perm[n_hold:]
    model.fit(take(x, train), y[train])
    pred = model.predict(take(x, test))
    rho = float(spearman(pred[:, None], y[test][:, None])[0])
    return SelectorReport(rho, auc(pred, top_labels(y[test], top_p)), int(train.size), int(test.size),
                          str(getattr(model, "head", "lora")))


def take(x: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of an array, or those items of a sequence."""
    if isinstance(x, np.ndarray):
        return x[index]
    return [x[i] for i in index]
