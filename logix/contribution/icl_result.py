"""What an in-context contribution pass measured, and the scores derived from it.

``c_ij = (PR_ij - PT_ij) / (P0_i + 1e-6)`` per candidate ``j`` and probe ``i`` (see
:mod:`logix.contribution.icl`); a candidate's score is ``mean_i c_ij``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-6


def sigmoid_map(x: np.ndarray | float) -> np.ndarray:
    """``1`` if ``x > 0.5``, ``-1`` if ``x < -0.5``, else ``2 / (1 + exp(-50 x)) - 1`` (elementwise).

    Args:
        x: Contributions ``c_ij`` (or one).

    Returns:
        The mapped values, in [-1, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    mid = 2.0 / (1.0 + np.exp(-50.0 * np.clip(x, -0.5, 0.5))) - 1.0
    return np.where(x > 0.5, 1.0, np.where(x < -0.5, -1.0, mid))


@dataclass
class IclResult:
    """Logged likelihoods of an in-context contribution pass and the scores derived from them.

    Arrays are indexed ``[candidate, probe]`` (``ids`` x ``probe_ids``) or ``[probe]``; NLLs are sums
    over response tokens (float64 nats), counts are response token counts. The scores are
    properties: :attr:`score` (``mean_i c_ij``), :attr:`share_positive`, :attr:`variance` and
    :attr:`sigmoid_score`; :meth:`records` lists them per candidate.

    Attributes:
        ids: The candidates' ids.
        probe_ids: The probes' ids.
        nll0: ``[probe]`` NLL of each probe's response without a demonstration.
        n0: ``[probe]`` its response token counts.
        nll_t: ``[candidate, probe]`` NLL with the candidate as demonstration.
        n_t: ``[candidate, probe]`` the token counts.
        nll_r: ``[candidate, probe]`` NLL with the candidate's random control as demonstration.
        n_r: ``[candidate, probe]`` the token counts.
        control: The control: ``chars``, ``tokens`` or ``none`` (then ``nll_r`` is ``nll0``).
    """

    ids: list[str]
    probe_ids: list[str]
    nll0: np.ndarray
    n0: np.ndarray
    nll_t: np.ndarray
    n_t: np.ndarray
    nll_r: np.ndarray
    n_r: np.ndarray
    control: str

    @property
    def p0(self) -> np.ndarray:
        """``PPL(y_i | x_i)`` per probe."""
        return np.exp(self.nll0 / self.n0)

    @property
    def pt(self) -> np.ndarray:
        """``PPL(y_i | ctx_j + sep + x_i)``, ``[candidate, probe]``."""
        return np.exp(self.nll_t / self.n_t)

    @property
    def pr(self) -> np.ndarray:
        """``PPL(y_i | rnd(ctx_j) + sep + x_i)`` (equal to ``p0`` with ``control="none"``)."""
        return np.exp(self.nll_r / self.n_r)

    @property
    def c(self) -> np.ndarray:
        """``c_ij = (PR_ij - PT_ij) / (P0_i + 1e-6)``; positive when the demonstration helps probe i."""
        return (self.pr - self.pt) / (self.p0[None, :] + EPS)

    @property
    def score(self) -> np.ndarray:
        """Global score of each candidate: ``mean_i c_ij``."""
        return self.c.mean(axis=1)

    @property
    def share_positive(self) -> np.ndarray:
        """Share of probes with ``c_ij > 0``."""
        return (self.c > 0).mean(axis=1)

    @property
    def variance(self) -> np.ndarray:
        """Variance of ``c_ij`` over the probes (population variance, ``ddof=0``)."""
        return self.c.var(axis=1)

    @property
    def sigmoid_score(self) -> np.ndarray:
        """``mean_i sigmoid_map(c_ij)``: a bounded score in [-1, 1] that a few extreme probes cannot dominate."""
        return sigmoid_map(self.c).mean(axis=1)

    def records(self) -> list[dict[str, Any]]:
        """One dict per candidate: ``id, score, share_positive, variance, sigmoid_score``."""
        cols = (self.score, self.share_positive, self.variance, self.sigmoid_score)
        return [
            {"id": cid, "score": float(s), "share_positive": float(p), "variance": float(v), "sigmoid_score": float(g)}
            for cid, s, p, v, g in zip(self.ids, *cols)
        ]

    def subset(self, ids: Sequence[str]) -> IclResult:
        """The result restricted to the given candidate ids (in that order)."""
        where = {cid: i for i, cid in enumerate(self.ids)}
        rows = [where[str(i)] for i in ids]
        return dataclasses.replace(
            self, ids=[self.ids[r] for r in rows], nll_t=self.nll_t[rows], n_t=self.n_t[rows],
            nll_r=self.nll_r[rows], n_r=self.n_r[rows],
        )
