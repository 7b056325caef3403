"""The evaluation statistics agree with scipy's, column by column (ties, constant columns, NaN)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from logix.analysis.evaluate import lds, rankdata, spearman


def columns(seed: int = 0, n: int = 60, m: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, m)), rng.normal(size=(n, m))
    a[:, :3] = np.round(a[:, :3], 1)  # ties
    b[:, 1:4] = np.round(b[:, 1:4])  # many ties
    b[:, 4] = 0.5 * a[:, 4] + 0.1 * b[:, 4]  # a strong correlation
    return a, b


def test_spearman_matches_scipy_per_column():
    a, b = columns()
    expected = [stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(a.shape[1])]
    np.testing.assert_allclose(spearman(a, b), expected, rtol=1e-12, atol=1e-14)


def test_spearman_constant_or_nan_columns_are_nan():
    a, b = columns(1)
    a[:, 0] = 2.0  # constant: no correlation defined
    b[5, 1] = np.nan
    rho = spearman(a, b)
    assert np.isnan(rho[0]) and np.isnan(rho[1])
    assert rho[2] == pytest.approx(stats.spearmanr(a[:, 2], b[:, 2]).statistic)
    with pytest.raises(ValueError, match="one shape"):
        spearman(a, b[:, :2])


def test_rankdata_is_scipys_average_ranks_from_zero():
    a, _ = columns(2)
    np.testing.assert_array_equal(rankdata(a), stats.rankdata(a, axis=0) - 1)
    np.testing.assert_array_equal(rankdata(np.array([[3.0], [1.0], [3.0]]))[:, 0], [1.5, 0.0, 1.5])


def test_lds_is_the_mean_spearman_of_predicted_and_measured():
    rng = np.random.default_rng(3)
    scores, masks = rng.normal(size=(4, 30)), rng.random((50, 30)) < 0.5
    outputs = masks @ scores.T + rng.normal(size=(50, 4))
    result = lds(scores, masks, outputs)
    expected = [stats.spearmanr(masks @ scores[q], outputs[:, q]).statistic for q in range(4)]
    np.testing.assert_allclose(result.per_query, expected, rtol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))
