"""The raw-joint preconditioner: ``(G^T G / n + d I)^-1`` over the whole concatenated row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from logix.analysis import Damping, Preconditioner, compute_influence, load_checkpoint
from logix.core.statistics import JOINT
from logix.errors import ConfigError, LogixError, StatisticsError
from tests.helpers import rel_err

N, NQ, D_IN, HIDDEN, C = 24, 5, 4, 5, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()


def _logged(tmp_path, name="j", raw_max_dim=4096, ranks=(3, 2)):
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N + NQ, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N + NQ,), generator=gen)
    cfg = {"projection": {"type": "random", "rank_in": ranks[0], "rank_out": ranks[1], "seed": 3},
           "capture": {"compute_dtype": "float64"},
           "statistics": {"kfac": True, "raw": True, "raw_joint": True, "raw_max_dim": raw_max_dim},
           "store": {"dtype": "float32"}}  # the oracles read the stored rows: unquantized
    run = logix.init(name, config=cfg, root=tmp_path)
    run.watch(model)
    for lo in range(0, N, 7):
        ids = list(range(lo, min(lo + 7, N)))
        with run(data_id=ids):
            nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=list(range(NQ))):
        nn.functional.cross_entropy(model(x[N:]), y[N:], reduction="sum").backward()
    run.finalize()
    return run


def _oracle(run, damping: Damping):
    g = run.store().read_all().double()
    q = run.store("queries").read_all().double()
    cov = g.T @ g / N
    d = damping.value * float(torch.linalg.eigvalsh(cov).mean()) if damping.relative else damping.value
    inv = torch.linalg.inv(cov + d * torch.eye(cov.shape[0], dtype=cov.dtype))
    return g, q, inv, d


def test_whole_row_covariance_and_preconditioner_equal_the_explicit_formula(tmp_path):
    run = _logged(tmp_path)
    g = run.store().read_all().double()
    assert g.shape[1] == run.layout.dim == 3 * 2 + 3 * 2  # two modules, cross terms included
    assert rel_err(run.statistics.mean(JOINT, "raw"), g.T @ g / N) < 1e-6  # rows are stored as float32
    assert run.statistics.count(JOINT, "examples") == N
    for damping in (Damping(0.1), Damping(1.0), Damping(1e-3, relative=False)):
        _, q, inv, d = _oracle(run, damping)
        pre = Preconditioner("raw-joint", run.statistics, run.store().layout, damping)
        assert set(pre.damping) == {"0", "2"} and abs(pre.damping["0"] - d) < 1e-6 * d
        assert rel_err(pre(q), q @ inv) < 1e-5
    # it is not the block-diagonal raw preconditioner (the cross-module blocks matter)
    block = Preconditioner("raw", run.statistics, run.store().layout, Damping(0.1))
    assert rel_err(block(q), pre(q)) > 1e-3


@pytest.mark.parametrize("mode", ["dot", "cosine", "relative", "unit"])
def test_scores_and_self_influence_with_raw_joint(tmp_path, mode):
    run = _logged(tmp_path)
    damping = Damping(0.3)
    g, q, inv, _ = _oracle(run, damping)
    if mode == "unit":
        g, q = g / g.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    dots = q @ inv @ g.T
    self_inf = ((g @ inv) * g).sum(1)
    expected = {"dot": dots, "unit": dots, "relative": dots / self_inf.sqrt()[None],
                "cosine": dots / (((q @ inv) * q).sum(1).sqrt()[:, None] * self_inf.sqrt()[None])}[mode]
    cp = load_checkpoint(run.dir, "raw-joint", damping)
    path = tmp_path / "scores.h5"
    result = compute_influence(cp, mode=mode, top_k=3, chunk_rows=5, scores_path=path, progress=False,
                               per_module=True, dtype=torch.float64)
    import h5py

    with h5py.File(path) as fh:
        scores = torch.from_numpy(fh["scores"][()]).double()
    assert rel_err(scores, expected) < 1e-5  # float32 rows and HDF5 matrix
    assert rel_err(result.self_influence, self_inf) < 1e-5
    top = expected.topk(3, dim=1)
    assert rel_err(result.top_scores, top.values) < 1e-5
    assert torch.equal(torch.tensor([[int(i) for i in row] for row in result.top_ids]), top.indices)
    parts = sum(result.per_module.values())  # per-module parts still sum to the score
    assert rel_err(parts, result.top_scores) < 1e-10


def test_raw_joint_errors(tmp_path):
    run = _logged(tmp_path)
    layout = run.store().layout
    with pytest.raises(StatisticsError, match="one damping for the whole row"):
        Preconditioner("raw-joint", run.statistics, layout, {"0": Damping(0.1), "2": Damping(1.0)})
    no_joint = logix.Statistics.from_flat({k: v for k, v in run.statistics.flat().items()
                                           if not k.startswith(JOINT)}, frozen=True)
    with pytest.raises(StatisticsError, match="statistics.raw_joint=true"):
        Preconditioner("raw-joint", no_joint, layout)
    with pytest.raises(LogixError, match=r"12 entries.*raw_max_dim=10.*MB"):
        _logged(tmp_path, "big", raw_max_dim=10)


def test_default_damping_is_per_preconditioner(tmp_path):
    """Without a damping, raw-joint uses relative 3, raw relative 2, EK-FAC on projected rows relative
    0.01 and the other block preconditioners (EK-FAC on full rows included) relative 0.1."""
    from logix.analysis import default_damping
    from logix.config import PreconditionerType

    run = _logged(tmp_path)
    assert default_damping("raw-joint") == Damping(3.0) and default_damping("raw") == Damping(2.0)
    assert default_damping("kfac") == Damping(0.1) and default_damping("ekfac") == Damping(0.01)
    assert default_damping("ekfac", projected=False) == Damping(0.1)
    auto = load_checkpoint(run.dir).preconditioner  # auto: the run logged EK-FAC corrections (the default)
    assert auto.kind is PreconditionerType.EKFAC
    for name in ("0", "2"):
        d = 0.01 * float(run.statistics.mean(name, "ekfac").mean())  # projected rows: relative 0.01
        assert abs(auto.damping[name] - d) < 1e-6 * d
    _, q, inv, d = _oracle(run, Damping(3.0))
    cp = load_checkpoint(run.dir, "raw-joint")
    assert abs(cp.preconditioner.damping["0"] - d) < 1e-6 * d
    assert rel_err(cp.preconditioner(q), q @ inv) < 1e-5
    raw = load_checkpoint(run.dir, "raw").preconditioner.damping
    block = run.statistics.mean("0", "raw")
    assert abs(raw["0"] - 2.0 * float(torch.linalg.eigvalsh(block).mean())) < 1e-10


def test_config_damping_null_means_the_preconditioners_default():
    """A null analysis.damping resolves to None: the preconditioner picks its own default once its
    kind (``auto``: the run's best) and whether the rows are projected are known."""
    from logix.analysis import default_damping
    from logix.config import AnalysisConfig, PreconditionerType

    assert AnalysisConfig().preconditioner is PreconditionerType.AUTO and AnalysisConfig().damping is None
    assert AnalysisConfig().resolved_damping() is None
    for kind in ("raw-joint", "kfac", "ekfac", "identity"):
        assert AnalysisConfig(preconditioner=kind).resolved_damping() is None
    assert default_damping("raw-joint") == Damping(3.0, True) and default_damping("kfac") == Damping(0.1, True)
    assert default_damping("ekfac") == Damping(0.01, True) and default_damping("ekfac", False) == Damping(0.1, True)
    assert AnalysisConfig(preconditioner="kfac", damping=0.1).resolved_damping() == Damping(0.1, True)
    assert AnalysisConfig(preconditioner="raw-joint", damping=0.5, damping_relative=False).resolved_damping() \
        == Damping(0.5, False)
    with pytest.raises(ConfigError, match="number >= 0 or null"):
        AnalysisConfig(damping=-1.0)
