"""The selector's statistics agree with scikit-learn's: AUC, and ridge with its leave-one-out alpha."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from logix.contribution import Selector, auc
from logix.contribution.selector_heads import ridge_fit


def test_auc_is_roc_auc_score_with_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=200), 1)
    labels = rng.random(200) < 0.2
    assert auc(s, labels) == pytest.approx(roc_auc_score(labels, s), rel=1e-12)
    assert math.isnan(auc(s, np.ones(200, bool)))


@pytest.mark.parametrize("n, d", [(40, 5), (30, 80)])  # more features than examples too
def test_ridge_fit_alpha_is_the_brute_force_leave_one_out_choice(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) * 0.2 + rng.normal(size=n)
    xc, yc = x - x.mean(0), y - y.mean()
    alphas = [0.01, 0.3, 3.0, 30.0, 300.0]

    def loo(alpha):
        errs = []
        for i in range(n):
            keep = np.arange(n) != i
            model = Ridge(alpha=alpha).fit(x[keep], y[keep])
            errs.append((y[i] - model.predict(x[i:i + 1])[0]) ** 2)
        return float(np.mean(errs))

    errors = [loo(a) for a in alphas]
    w, alpha, err = ridge_fit(xc, yc, alphas)
    assert alpha == alphas[int(np.argmin(errors))]
    assert err == pytest.approx(min(errors), rel=1e-8)
    np.testing.assert_allclose(w, Ridge(alpha=alpha).fit(x, y).coef_, rtol=1e-8, atol=1e-12)


def test_ridge_selector_predicts_as_sklearn_ridge_on_standardized_features():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 7)) * np.arange(1, 8)
    y = x @ rng.normal(size=7) + rng.normal(size=60)
    sel = Selector("ridge").fit(x, y)
    z = (x - x.mean(0)) / x.std(0)
    scale = float(np.mean(z**2)) * z.shape[1]
    model = Ridge(alpha=sel.fitted["alpha"] * scale).fit(z, y)
    np.testing.assert_allclose(sel.predict(x[:5]), model.predict(z[:5]), rtol=1e-10)
