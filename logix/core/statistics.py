"""Running statistics per module: KFAC factors, EK-FAC corrections, raw gradient covariance.

Sums and counts are accumulated (float64 by default) and normalised on read:

==========  =============================================  ==============
key         running sum                                    divided by
==========  =============================================  ==============
``A``       ``sum_t a_t a_t^T`` over unmasked tokens        ``tokens``
``S``       ``sum_t g_t g_t^T`` over unmasked tokens        ``tokens``
``ekfac``   ``sum_n (Q_S^T G_n Q_A)**2`` (elementwise)      ``examples``
``raw``     ``sum_n vec(G_n) vec(G_n)^T``                   ``examples``
==========  =============================================  ==============

With ``statistics.raw_joint`` the pseudo-module :data:`JOINT` holds ``raw`` and
``examples`` of the whole logged row ``r_n`` (every module's ``vec(G_n)``
concatenated in layout order): ``sum_n r_n r_n^T``, the statistic of the
``raw-joint`` preconditioner. It is accumulated wherever ``raw`` is (the log pass,
or the ``fisher`` pass with model labels), so it uses the same curvature labels.

``a_t`` includes the bias column, ``g_t`` is the gradient of the per-example
*summed* loss, ``G_n = sum_t g_t a_t^T`` (all in the space the pass logs in:
projected, or full for ``projection: none`` and the PCA covariance pass). With
these conventions the KFAC estimate of the per-example gradient second moment is
``E[vec G vec G^T] ~ (tokens / examples) * (A kron S)``. ``Q_A``/``Q_S`` are the
eigenvectors of ``A``/``S`` (float64), stored beside them as ``A_evecs``/``S_evecs``
with eigenvalues ``A_evals``/``S_evals``.

Once :meth:`Statistics.freeze` ran (at the end of a pass) nothing can change the
tensors; readers receive copies, so callers cannot modify them in place either.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from logix.core.checksum import load_tensors, save_tensors
from logix.errors import StatisticsError

SEP = "::"
JOINT = "__row__"  # pseudo-module of the whole-row (cross-module) raw covariance
_COUNT_OF = {"A": "tokens", "S": "tokens", "ekfac": "examples", "raw": "examples"}


class Statistics:
    """Per-module running sums that become immutable once frozen (``run.statistics``).

    Sums and counts are accumulated (float64 by default) and normalised on read by
    :meth:`mean`: ``A`` (``sum_t a_t a_t^T`` over unmasked tokens) and ``S`` (``sum_t g_t g_t^T``)
    divided by ``tokens``; ``ekfac`` (``sum_n (Q_S^T G_n Q_A)**2``) and ``raw``
    (``sum_n vec(G_n) vec(G_n)^T``) divided by ``examples``. ``a_t`` includes the bias column,
    ``g_t`` is the gradient of the per-example summed loss, ``G_n = sum_t g_t a_t^T``, all in the
    space the pass logs in. The eigenvectors and eigenvalues of ``A`` / ``S`` are stored beside
    them as ``A_evecs`` / ``A_evals`` / ``S_evecs`` / ``S_evals``. With ``statistics.raw_joint`` the
    pseudo-module ``__row__`` holds the ``raw`` covariance of the whole row. Once frozen (at the
    end of a pass) nothing can change; readers receive copies.

    Args:
        dtype: The dtype of the sums.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self._data: dict[str, dict[str, Tensor]] = {}
        self.frozen = False

    # ---- accumulation ---------------------------------------------------------------
    def add(self, module: str, key: str, value: Tensor | float) -> None:
        if self.frozen:
            raise StatisticsError("Statistics are finalized and cannot change.")
        slot = self._data.setdefault(module, {})
        value = torch.as_tensor(value, dtype=self.dtype).detach().to("cpu", self.dtype)
        if key in slot:
            slot[key] += value
        else:
            slot[key] = value.clone()

    def set(self, module: str, key: str, value: Tensor) -> None:
        if self.frozen:
            raise StatisticsError("Statistics are finalized and cannot change.")
        self._data.setdefault(module, {})[key] = value.detach().to("cpu").clone()

    def merge(self, batch: dict[str, dict[str, Tensor]]) -> None:
        for module, entries in batch.items():
            for key, value in entries.items():
                self.add(module, key, value)

    def freeze(self) -> None:
        self.frozen = True

    # ---- reading --------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return list(self._data)

    def has(self, module: str, key: str) -> bool:
        """Whether ``module`` has the statistic (or count) ``key``."""
        return key in self._data.get(module, {})

    def raw_sum(self, module: str, key: str) -> Tensor:
        """A copy of the stored tensor: the running sum itself (not normalised), or a count.

        Raises:
            StatisticsError: ``module`` has no statistic ``key`` (the message lists what it has).
        """
        try:
            return self._data[module][key].clone()
        except KeyError:
            raise StatisticsError(
                f"No statistic {key!r} for module {module!r}. Available: "
                f"{sorted(self._data.get(module, {}))}; modules: {self.modules}."
            ) from None

    def mean(self, module: str, key: str) -> Tensor:
        """The normalised statistic (sum divided by its token or example count).

        Args:
            module: The module's name.
            key: ``A``, ``S``, ``ekfac`` or ``raw``.

        Returns:
            A copy of the sum divided by its count.

        Raises:
            StatisticsError: The statistic is missing, or was computed from no data.
        """
        count = self.raw_sum(module, _COUNT_OF[key]).item()
        if count <= 0:
            raise StatisticsError(f"Statistic {key!r} of module {module!r} was computed from no data.")
        return self.raw_sum(module, key) / count

    def count(self, module: str, which: str) -> float:
        """A count of ``module``: ``tokens`` or ``examples``."""
        return float(self.raw_sum(module, which).item())

    # ---- (de)serialisation ------------------------------------------------------------
    def flat(self) -> dict[str, Tensor]:
        return {f"{m}{SEP}{k}": v.clone() for m, d in self._data.items() for k, v in d.items()}

    @classmethod
    def from_flat(cls, tensors: dict[str, Tensor], frozen: bool = False) -> Statistics:
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float64
        stats = cls(dtype)
        for full_key, value in tensors.items():
            module, key = full_key.rsplit(SEP, 1)
            stats._data.setdefault(module, {})[key] = value.clone()
        stats.frozen = frozen
        return stats

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_tensors(tmp, self.flat())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, frozen: bool = True) -> Statistics:
        """Read statistics :meth:`save` wrote, verified against their checksum (a damaged or
        edited file raises :class:`~logix.errors.StoreError` naming it)."""
        return cls.from_flat(load_tensors(path), frozen=frozen)

    def __repr__(self) -> str:
        keys = sorted({k for d in self._data.values() for k in d})
        return f"Statistics(modules={len(self._data)}, keys={keys}, frozen={self.frozen})"


def eigendecompose(stats: Statistics, modules: Iterable[str]) -> None:
    """Store float64 eigenvalues/eigenvectors of the normalised ``A`` and ``S`` of each module."""
    for module in modules:
        for key in ("A", "S"):
            cov = stats.mean(module, key).to(torch.float64)
            if not torch.isfinite(cov).all():
                raise StatisticsError(
                    f"Module {module!r}: covariance {key} contains NaN/Inf (diverged training or "
                    "an overflowing dtype); cannot eigendecompose."
                )
            cov = 0.5 * (cov + cov.T)
            evals, evecs = torch.linalg.eigh(cov)
            stats.set(module, f"{key}_evals", evals)
            stats.set(module, f"{key}_evecs", evecs)
