"""The default projection: seeded random orthonormal directions (``projection.type: orthogonal``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from logix.analysis import Damping, influence
from logix.core.projection import orthogonal_projection, random_projection
from logix.errors import ConfigError


def test_columns_are_orthonormal_scaled_and_reproducible():
    p = orthogonal_projection("layer", 10, 4, seed=0, side="in").double()
    assert p.shape == (10, 4) and p.dtype == torch.float64
    assert torch.allclose(p.T @ p, torch.eye(4, dtype=torch.float64) * 10 / 4, atol=1e-5)
    full = orthogonal_projection("layer", 6, 6, seed=0, side="out").double()
    assert torch.allclose(full @ full.T, torch.eye(6, dtype=torch.float64), atol=1e-6)  # k = d: nothing lost
    assert torch.equal(orthogonal_projection("layer", 10, 4, 0, "in"), orthogonal_projection("layer", 10, 4, 0, "in"))
    for other in (("other", 10, 4, 0, "in"), ("layer", 10, 4, 1, "in"), ("layer", 10, 4, 0, "out")):
        assert not torch.allclose(orthogonal_projection(*other), orthogonal_projection("layer", 10, 4, 0, "in"))
    with pytest.raises(ConfigError, match="exceeds"):
        orthogonal_projection("layer", 3, 4, 0, "in")


def test_inner_products_are_unbiased():
    """E[P P^T] = I over seeds, as for the Gaussian projection (k < d)."""
    mean = sum(orthogonal_projection("m", 8, 3, s, "in").double() @ orthogonal_projection("m", 8, 3, s, "in").double().T
               for s in range(3000)) / 3000
    assert torch.allclose(mean, torch.eye(8, dtype=torch.float64), atol=0.06)


def _scores(tmp_path, name: str, projection: dict, preconditioner: str) -> tuple[list, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    run = logix.init(name, config={"projection": projection, "statistics": {"kfac": True, "ekfac": True},
                                   "store": {"dtype": "float32"}}, root=tmp_path)
    run.watch(net)
    for _ in run.plan():
        for lo in range(0, 24, 8):
            with run(data_id=list(range(lo, lo + 8))):
                nn.functional.cross_entropy(net(x[lo:lo + 8]), y[lo:lo + 8], reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=["q0", "q1", "q2"]):
        nn.functional.cross_entropy(net(x[:3] + 0.5), y[:3], reduction="sum").backward()
    run.finalize()
    result = influence(run.dir, preconditioner=preconditioner, damping=Damping(0.1), top_k=24, progress=False,
                       self_influence=False)
    return result.top_ids, result.top_scores.double()


@pytest.mark.parametrize("preconditioner", ["identity", "kfac", "ekfac"])
def test_at_full_rank_it_scores_as_the_unprojected_gradients(tmp_path, preconditioner):
    """Ranks that reach every module's size: the orthogonal rows are a rotation of the full
    gradients, so dot products, KFAC and EK-FAC (whose eigenbasis rotates with them) score exactly
    as ``projection: none``; the Gaussian projection at the same ranks does not."""
    ids, full = _scores(tmp_path, "none", {"type": "none"}, preconditioner)
    ortho_ids, ortho = _scores(tmp_path, "ortho", {"type": "orthogonal", "rank_in": 8, "rank_out": 8},
                               preconditioner)
    assert ortho_ids == ids
    assert torch.allclose(ortho, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))
    _, gauss = _scores(tmp_path, "gauss", {"type": "random", "rank_in": 8, "rank_out": 8}, preconditioner)
    assert (gauss - full).norm() > 1e-2 * full.norm()


def test_the_default_is_orthogonal_and_random_stays_gaussian(tmp_path):
    assert logix.Config().projection.type.value == "orthogonal"
    run = logix.init("gauss", config={"projection": {"type": "random", "rank_in": 3, "rank_out": 2}}, root=tmp_path)
    run.watch(nn.Sequential(nn.Linear(6, 5)))
    name = next(iter(run.projections))
    assert torch.equal(run.projections[name].p_in, random_projection(name, 7, 3, 0, "in"))
