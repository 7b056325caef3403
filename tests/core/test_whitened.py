"""``projection: whitened``: random directions of the KFAC-whitened space.

Oracles: with full ranks, ``P P^T`` is the damped inverse of each covariance factor, so plain dot
products of the stored rows equal the KFAC-preconditioned influence
``vec(G_q)^T ((A + d_A)^-1 kron (S + d_S)^-1) vec(G_t)`` computed from autograd per-example
gradients; at lower ranks every row equals ``P_out^T G P_in`` of its autograd gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from logix.analysis import Checkpoint, Preconditioner, compute_influence
from logix.errors import ConfigError
from tests.helpers import per_example_grads, projected, rel_err

N_TRAIN, N_QUERY, DAMPING = 40, 5, 0.05


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_QUERY, 5, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=gen)
    return x, y


def _log(tmp_path, model, ranks):
    x, y = _data()
    cfg = {"projection": {"type": "whitened", "ranks": ranks, "whiten_damping": DAMPING},
           "statistics": {"kfac": True, "ekfac": False},
           "store": {"shard_rows": 16, "dtype": "float32"}}  # rows and scores vs autograd oracles
    run = logix.init("w", config=cfg, root=tmp_path, overwrite=True)
    run.watch(model)
    assert run.passes == ["covariance", "log"]
    for _ in run.plan():
        for lo in range(0, N_TRAIN, 8):
            idx = list(range(lo, lo + 8))
            with run(data_id=idx):
                nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
            model.zero_grad(set_to_none=True)
    run.finalize()
    qidx = list(range(N_TRAIN, N_TRAIN + N_QUERY))
    with run.log_queries(data_id=qidx):
        nn.functional.cross_entropy(model(x[qidx]), y[qidx], reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    run.finalize()
    return run


def _autograd(model):
    x, y = _data()
    return per_example_grads(model, ["0", "2"], N_TRAIN + N_QUERY,
                             lambda i: nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"))


def _damped_inverse(cov: torch.Tensor) -> torch.Tensor:
    cov = cov.to(torch.float64)
    evals = torch.linalg.eigvalsh(cov).clamp_min(0)
    return torch.linalg.inv(cov + DAMPING * evals.mean() * torch.eye(cov.shape[0], dtype=torch.float64))


def test_full_rank_whitened_rows_score_exactly_the_kfac_influence(tmp_path):
    model = _model()
    run = _log(tmp_path, model, {"*": [6, 4]})  # full ranks: d_in + 1 = 5 + 1, d_out = 4 (then 5, 3)
    full = run.full_statistics
    grads = _autograd(model)
    expected = torch.zeros(N_QUERY, N_TRAIN, dtype=torch.float64)
    for name in ("0", "2"):
        a_inv, s_inv = _damped_inverse(full.mean(name, "A")), _damped_inverse(full.mean(name, "S"))
        proj = run.projections[name]  # P P^T is the damped inverse of each factor
        torch.testing.assert_close(proj.p_in.double() @ proj.p_in.double().T, a_inv, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(proj.p_out.double() @ proj.p_out.double().T, s_inv, rtol=1e-4, atol=1e-5)
        g = grads[name].to(torch.float64)  # (n, d_out, d_in + 1)
        pre = s_inv @ g[N_TRAIN:] @ a_inv  # (A^-1 kron S^-1) vec(G_q), as a matrix
        expected += torch.einsum("qij,tij->qt", pre, g[:N_TRAIN])
    store = run.store()
    queries = run.store("queries").read_all()
    cp = Checkpoint(store, queries, Preconditioner("identity", None, store.layout))
    result = compute_influence(cp, top_k=N_TRAIN, dtype=torch.float64, progress=False)
    order = [store.ids.index(i) for i in range(N_TRAIN)]
    got = torch.zeros(N_QUERY, N_TRAIN, dtype=torch.float64)
    for q in range(N_QUERY):
        for tid, score in zip(result.top_ids[q], result.top_scores[q].tolist()):
            got[q, tid] = score
    assert rel_err(got, expected) < 1e-4
    assert order == list(range(N_TRAIN))


def test_low_rank_whitened_rows_are_the_projection_of_autograd_gradients(tmp_path):
    model = _model()
    run = _log(tmp_path, model, {"*": [3, 2]})
    grads = _autograd(model)
    store = run.store()
    for name in ("0", "2"):
        rows = store.get(list(range(N_TRAIN)), modules=[name]).to(torch.float64)
        oracle = projected(run, name, grads[name][:N_TRAIN]).reshape(N_TRAIN, -1)
        assert rel_err(rows, oracle) < 1e-5
    # the projection is saved with the run and read back for scoring
    from logix.analysis import run_projections

    again = run_projections(run.dir, None, store.layout)
    for name in ("0", "2"):
        torch.testing.assert_close(again[name].p_in, run.projections[name].p_in)


def test_whiten_damping_must_be_positive():
    with pytest.raises(ConfigError, match="whiten_damping"):
        logix.Config.from_dict({"projection": {"type": "whitened", "whiten_damping": 0}})
