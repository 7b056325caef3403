"""LoGra projectors: per-module ``P_in`` (d_in+bias x k_in) and ``P_out`` (d_out x k_out).

The logged gradient of a module is ``P_out^T G P_in`` where ``G = sum_t g_t a_t^T``
is its full per-example gradient; hooks compute it as ``sum_t (g_t P_out)^T (a_t P_in)``
so ``G`` is never formed.

* ``orthogonal`` (the default): ``k`` random orthonormal columns scaled by ``sqrt(d / k)``
  from a generator seeded by the run's seed and a stable hash of the module name, so every
  process builds the same matrices and ``E[P P^T] = I`` (projected inner products are unbiased
  estimates of full ones); exact (``P P^T = I``) where ``k`` reaches the module's size.
* ``random``: Gaussian entries ``N(0, 1/k)`` from the same seeds (also unbiased, with more
  variance: its columns overlap).
* ``pca``: the top-``k`` eigenvectors of the module's activation covariance ``A``
  and output-gradient covariance ``S`` measured in a previous pass.
* ``none``: identity; the full gradient is logged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from logix.config.choices import ProjectionType
from logix.core.checksum import load_tensors, save_tensors
from logix.errors import ConfigError, StatisticsError


@dataclass(frozen=True)
class Prepared:
    """A projection cast to the hooks' device and dtype, laid out for ``F.linear``."""

    p_in: Tensor | None  # (d_in_aug, k_in)
    in_weight: Tensor | None  # (k_in, d_in): P_in[:d_in]^T, contiguous
    in_bias: Tensor | None  # (k_in,): the bias row of P_in, or None
    out_weight: Tensor | None  # (k_out, d_out): P_out^T, contiguous


@dataclass
class ModuleProjection:
    """Projection matrices of one module (None means identity)."""

    p_in: Tensor | None
    p_out: Tensor | None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def prepared(self, device: torch.device, dtype: torch.dtype, bias: bool) -> Prepared:
        """The matrices on ``device`` in ``dtype`` (cached per device and dtype)."""
        key = (device, dtype, bias)
        if key not in self._cache:
            p_in = None if self.p_in is None else self.p_in.to(device, dtype)
            in_weight = in_bias = None
            if p_in is not None:
                in_weight = (p_in[:-1] if bias else p_in).T.contiguous()
                in_bias = p_in[-1].contiguous() if bias else None
            out_weight = None if self.p_out is None else self.p_out.to(device, dtype).T.contiguous()
            self._cache[key] = Prepared(p_in, in_weight, in_bias, out_weight)
        return self._cache[key]

    @property
    def k_in(self) -> int | None:
        return None if self.p_in is None else self.p_in.shape[1]

    @property
    def k_out(self) -> int | None:
        return None if self.p_out is None else self.p_out.shape[1]


def module_seed(seed: int, name: str) -> int:
    """A seed that depends on the run seed and the module name, stable across processes."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def random_projection(name: str, d: int, k: int, seed: int, side: str) -> Tensor:
    """A ``(d, k)`` Gaussian matrix with ``N(0, 1/k)`` entries, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(module_seed(seed, f"{name}:{side}"))
    return torch.randn(d, k, generator=gen, dtype=torch.float32) / k**0.5


def orthogonal_projection(name: str, d: int, k: int, seed: int, side: str) -> Tensor:
    """A ``(d, k)`` matrix of seeded random orthonormal columns scaled by ``sqrt(d / k)`` (``k <= d``).

    The Q factor of a seeded Gaussian matrix (signs fixed by R's diagonal, so the draw is unique).
    Like the Gaussian ``random_projection`` it keeps inner products unbiased (``E[P P^T] = I``),
    with less variance (the columns do not overlap), and it loses nothing when ``k = d``
    (``P P^T = I``): a module whose size the rank reaches is stored exactly, up to a rotation that
    EK-FAC's eigenbasis follows.
    """
    if k > d:
        raise ConfigError(f"Module {name!r}: orthogonal rank {k} exceeds the {side} dimension {d}.")
    gen = torch.Generator().manual_seed(module_seed(seed, f"{name}:{side}"))
    q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)[None, :]
    return (q * (d / k) ** 0.5).to(torch.float32).contiguous()


def seeded_projection(ptype: ProjectionType, name: str, d: int, k: int, seed: int, side: str) -> Tensor:
    """The ``(d, k)`` projection of a seeded type (``orthogonal`` or ``random``) for one side of a module."""
    if ptype is ProjectionType.ORTHOGONAL:
        return orthogonal_projection(name, d, k, seed, side)
    return random_projection(name, d, k, seed, side)


def pca_projection(name: str, cov: Tensor, k: int, side: str) -> Tensor:
    """The top-``k`` eigenvectors (as columns, by decreasing eigenvalue) of ``cov``."""
    d = cov.shape[0]
    if k > d:
        raise ConfigError(
            f"Module {name!r}: PCA rank {k} exceeds the {side} dimension {d}. "
            f"Lower the rank for this module with projection.ranks."
        )
    cov64 = cov.to(torch.float64)
    if not torch.isfinite(cov64).all():
        raise StatisticsError(f"Module {name!r}: the {side} covariance has NaN/Inf; cannot run PCA.")
    evals, evecs = torch.linalg.eigh(cov64)
    top = evecs[:, torch.argsort(evals, descending=True)[:k]]
    return top.to(torch.float32).contiguous()


def whitened_projection(name: str, cov: Tensor, k: int, seed: int, side: str, damping: float) -> Tensor:
    """``(C + d I)^-1/2 R``: ``k`` random directions of the space whitened by the covariance ``C``.

    ``d`` is ``damping`` times the mean eigenvalue of ``C``; ``R`` (``dim x k``) has orthonormal
    columns scaled by ``sqrt(dim / k)`` (the Q factor of a seeded Gaussian matrix), so that
    ``E[R R^T] = I`` and ``R R^T = I`` exactly when ``k = dim``. For a module whose per-example
    gradient is ``G`` (``d_out x d_in``) the stored block ``P_out^T G P_in`` then satisfies
    ``E[<P^T G_q P, P^T G_t P>] = vec(G_q)^T ((A + d_A)^-1 kron (S + d_S)^-1) vec(G_t)``: plain dot
    products of stored rows estimate the KFAC-preconditioned influence, with the projection
    error measured in the metric the preconditioner uses (a random projection of the raw gradient
    spends its dimensions on high-curvature directions that ``H^-1`` then down-weights).
    """
    dim = cov.shape[0]
    if k > dim:
        raise ConfigError(f"Module {name!r}: whitened rank {k} exceeds the {side} dimension {dim}.")
    cov64 = cov.to(torch.float64)
    if not torch.isfinite(cov64).all():
        raise StatisticsError(f"Module {name!r}: the {side} covariance has NaN/Inf; cannot whiten.")
    evals, evecs = torch.linalg.eigh(0.5 * (cov64 + cov64.T))
    evals = evals.clamp_min(0)
    shift = damping * float(evals.mean())
    if shift <= 0:
        raise StatisticsError(
            f"Module {name!r}: the {side} covariance is zero (no data reached it); cannot whiten."
        )
    gen = torch.Generator().manual_seed(module_seed(seed, f"{name}:{side}:whitened"))
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    basis = basis * (dim / k) ** 0.5
    inv_sqrt = (evecs * (evals + shift).rsqrt()[None, :]) @ evecs.T
    return (inv_sqrt @ basis).to(torch.float32).contiguous()


def save_projections(path: Path, projections: dict[str, ModuleProjection]) -> None:
    tensors: dict[str, Tensor] = {}
    for name, proj in projections.items():
        if proj.p_in is not None:
            tensors[f"{name}::in"] = proj.p_in.contiguous()
        if proj.p_out is not None:
            tensors[f"{name}::out"] = proj.p_out.contiguous()
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_tensors(tmp, tensors)
    tmp.replace(path)


def load_projections(path: Path, names: list[str]) -> dict[str, ModuleProjection]:
    tensors = load_tensors(path) if path.exists() else {}
    return {
        name: ModuleProjection(tensors.get(f"{name}::in"), tensors.get(f"{name}::out"))
        for name in names
    }
