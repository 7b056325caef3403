"""Influence scores against brute-force formulas."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import logix
from logix.analysis import (
    Checkpoint,
    Damping,
    Preconditioner,
    compute_influence,
    influence,
    lds,
    load_checkpoint,
    spearman,
)
from tests.helpers import per_example_grads, rel_err

N_TRAIN, N_QUERY = 40, 5


def _setup(tmp_path, projection="none", stats=None, name="inf", seed=0):
    """A one-layer model (so block-diagonal == full) logged with train rows and queries."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(N_TRAIN + N_QUERY, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=gen)
    cfg = {
        "projection": {"type": projection, "rank_in": 3, "rank_out": 2},
        "capture": {"compute_dtype": "float64"},
        "statistics": stats or {"kfac": True, "ekfac": True, "raw": True},
        "store": {"dtype": "float32"},  # the oracles are exact: unquantized rows
    }
    run = logix.init(name, config=cfg, root=tmp_path)
    run.watch(model)

    def loss(idx):
        return nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum")

    for _ in run.plan():
        for lo in range(0, N_TRAIN, 8):
            idx = list(range(lo, lo + 8))
            with run(data_id=idx):
                loss(idx).backward()
    run.finalize()
    for lo in range(N_TRAIN, N_TRAIN + N_QUERY, 3):
        idx = list(range(lo, min(lo + 3, N_TRAIN + N_QUERY)))
        with run.log_queries(data_id=[f"q{i - N_TRAIN}" for i in idx]):
            loss(idx).backward()
    run.finalize()
    grads = per_example_grads(model, ["0"], N_TRAIN + N_QUERY, lambda i: loss([i]))["0"].flatten(1)
    return run, grads[:N_TRAIN], grads[N_TRAIN:]


def _full_scores(cp, **kw):
    kw.setdefault("dtype", torch.float64)
    res = compute_influence(cp, top_k=N_TRAIN, progress=False, **kw)
    out = torch.zeros(N_QUERY, N_TRAIN, dtype=torch.float64)
    for q in range(N_QUERY):
        out[q, res.top_ids[q]] = res.top_scores[q]
    return out, res


def test_identity_equals_brute_force_dot_products(tmp_path):
    run, train, query = _setup(tmp_path)
    cp = load_checkpoint(run.dir, "identity")
    assert rel_err(cp.queries.double(), query) < 1e-6  # queries logged like train rows
    scores, res = _full_scores(cp)
    assert rel_err(scores, query @ train.T) < 1e-5
    assert res.query_ids == list(range(N_QUERY))
    named = influence(run.dir, "identity", top_k=3, progress=False)
    assert named.query_ids == [f"q{i}" for i in range(N_QUERY)]


def test_raw_equals_explicit_damped_inverse(tmp_path):
    run, train, query = _setup(tmp_path)
    stats = run.statistics
    g = train
    for damping in (Damping(0.05, relative=False), Damping(0.1)):
        cp = load_checkpoint(run.dir, "raw", damping)
        cov = g.T @ g / N_TRAIN
        lam = damping.value * torch.linalg.eigvalsh(cov).mean() if damping.relative else damping.value
        expected = query @ torch.linalg.inv(cov + lam * torch.eye(cov.shape[0], dtype=torch.float64)) @ train.T
        scores, _ = _full_scores(cp)
        assert rel_err(scores, expected) < 1e-5
    assert rel_err(stats.mean("0", "raw"), g.T @ g / N_TRAIN) < 1e-6


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_explicit_kronecker_formulas(tmp_path, kind):
    run, train, query = _setup(tmp_path)
    stats = run.statistics
    a, s = stats.mean("0", "A"), stats.mean("0", "S")
    lam_a, q_a = torch.linalg.eigh(a)
    lam_s, q_s = torch.linalg.eigh(s)
    q = torch.kron(q_s, q_a)  # rows are stored row-major (k_out, k_in): vec(S V A) = (S kron A) vec(V)
    if kind == "kfac":
        ratio = stats.count("0", "tokens") / stats.count("0", "examples")
        spectrum = ratio * torch.kron(lam_s, lam_a)
        h = ratio * torch.kron(s, a)
        assert rel_err(q @ torch.diag(spectrum) @ q.T, h) < 1e-8
    else:
        q_a, q_s = stats.raw_sum("0", "A_evecs"), stats.raw_sum("0", "S_evecs")
        q = torch.kron(q_s, q_a)
        spectrum = stats.mean("0", "ekfac").flatten()
        rotated = (train @ q) ** 2  # corrections are E[(Q^T g)^2]
        assert rel_err(spectrum, rotated.mean(0)) < 1e-8
        h = q @ torch.diag(spectrum) @ q.T
    damping = 0.1 * spectrum.mean()
    expected = query @ torch.linalg.inv(h + damping * torch.eye(h.shape[0], dtype=torch.float64)) @ train.T
    scores, _ = _full_scores(load_checkpoint(run.dir, kind, Damping(0.1)))
    assert rel_err(scores, expected) < 1e-6


def test_self_influence_top_k_modes_chunks_and_repeatability(tmp_path):
    run, train, query = _setup(tmp_path)
    cp = load_checkpoint(run.dir, "ekfac")
    pairwise = Checkpoint(cp.train, cp.train.read_all(), cp.preconditioner)
    path = tmp_path / "scores.h5"
    res = compute_influence(
        pairwise, top_k=5, scores_path=path, progress=False, chunk_rows=7, query_batch=6, dtype=torch.float64
    )
    with h5py.File(path) as fh:
        full = torch.from_numpy(fh["scores"][()]).double()
    assert rel_err(res.self_influence, full.diagonal()) < 1e-5
    order = torch.argsort(full, dim=1, descending=True)
    assert res.top_ids == [[cp.train.ids[i] for i in row[:5]] for row in order.tolist()]
    bottom = torch.argsort(full, dim=1)
    assert res.bottom_ids == [[cp.train.ids[i] for i in row[:5]] for row in bottom.tolist()]

    base, base_res = _full_scores(cp)
    fast, _ = _full_scores(cp, dtype=torch.float32)  # the default GEMM dtype
    assert rel_err(fast, base) < 1e-5
    for kw in ({"chunk_rows": 1}, {"chunk_rows": 13}, {"memory_budget_mb": 0.001}, {"memory_budget_mb": 1e4},
               {"query_batch": 2, "chunk_rows": 9}, {"query_batch": 1}):
        scores, other = _full_scores(cp, **kw)  # equal up to GEMM summation order
        assert torch.allclose(scores, base, rtol=1e-12, atol=1e-12)
        assert torch.allclose(other.self_influence, base_res.self_influence, rtol=1e-12, atol=1e-12)
    load_checkpoint(run.dir, "ekfac", Damping(5.0))  # another damping in between changes nothing
    again, _ = _full_scores(load_checkpoint(run.dir, "ekfac"))
    assert torch.equal(again, base)

    h_q = (cp.preconditioner(cp.queries) * cp.queries.double()).sum(1)
    s_t = base_res.self_influence
    rel, _ = _full_scores(cp, mode="relative")
    assert rel_err(rel, base / s_t.sqrt()[None]) < 1e-10
    cos, _ = _full_scores(cp, mode="cosine")
    assert rel_err(cos, base / (h_q.sqrt()[:, None] * s_t.sqrt()[None])) < 1e-10
    assert cos.abs().max() <= 1 + 1e-9
    unit, _ = _full_scores(Checkpoint(cp.train, cp.queries, load_checkpoint(run.dir, "identity").preconditioner), mode="unit")
    qn, tn = query / query.norm(dim=1, keepdim=True), train / train.norm(dim=1, keepdim=True)
    assert rel_err(unit, qn @ tn.T) < 1e-5


def test_per_module_breakdown_sums_to_score(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    run = logix.init("pm", config={"statistics": {"kfac": True}}, root=tmp_path)
    run.watch(model)
    with run(data_id=list(range(16))):
        nn.functional.cross_entropy(model(x[:16]), y[:16], reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=list(range(4))):
        nn.functional.cross_entropy(model(x[16:]), y[16:], reduction="sum").backward()
    run.finalize()
    res = influence(run.dir, "kfac", top_k=4, per_module=True, progress=False, mode="relative", dtype=torch.float64)
    total = sum(res.per_module.values())
    assert set(res.per_module) == {"0", "2"}
    assert torch.allclose(total, res.top_scores, rtol=1e-6, atol=1e-9)


def test_checkpoints_combine_with_weights(tmp_path):
    run_a, train_a, query_a = _setup(tmp_path, name="a", seed=0)
    run_b, train_b, query_b = _setup(tmp_path, name="b", seed=0)
    cp_a, cp_b = load_checkpoint(run_a.dir, "identity", weight=0.3), load_checkpoint(run_b.dir, "identity", weight=2.0)
    combined, _ = _full_scores([cp_a, cp_b])
    expected = 0.3 * query_a @ train_a.T + 2.0 * query_b @ train_b.T
    assert rel_err(combined, expected) < 1e-5


def test_bad_inputs_fail_clearly(tmp_path):
    run, _, _ = _setup(tmp_path, stats={"kfac": True, "ekfac": False})
    with pytest.raises(logix.LogixError, match="statistics.ekfac=true"):
        load_checkpoint(run.dir, "ekfac")
    with pytest.raises(logix.LogixError, match="statistics.raw=true"):
        load_checkpoint(run.dir, "raw")
    with pytest.raises(ValueError, match="Choose between"):
        load_checkpoint(run.dir, "newton")
    cp = load_checkpoint(run.dir, "kfac")
    with pytest.raises(logix.LogixError, match="run.log_queries"):
        compute_influence(Checkpoint(cp.train, torch.zeros(2, 3), cp.preconditioner), progress=False)
    stats = logix.Statistics.from_flat({**run.statistics.flat(), "0::A": torch.full((5, 5), float("nan"))})
    with pytest.raises(logix.LogixError, match="NaN"):
        Preconditioner("kfac", stats, cp.train.layout)


def test_spearman_and_lds_on_a_hand_made_example():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    d = np.array([1, -1, 1, -1, 0])
    assert np.isclose(spearman(a[:, None], b[:, None])[0], 1 - 6 * (d**2).sum() / (5 * 24))
    assert np.isclose(spearman(a[:, None], -a[:, None])[0], -1.0)
    ties = spearman(np.array([[1.0], [1.0], [2.0]]), np.array([[1.0], [2.0], [3.0]]))[0]
    assert np.isclose(ties, np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    scores = np.array([[3.0, -1.0, 0.5, 2.0]])  # one query, four train examples
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    predicted = masks @ scores[0]  # [2, -0.5, 5, 2.5]
    outputs = np.array([[0.1], [-2.0], [4.0], [3.0]])
    result = lds(scores, masks, outputs)
    assert np.allclose(result.predicted[:, 0], predicted)
    assert np.isclose(result.mean, 1 - 6 * 0 / (4 * 15))  # same order -> 1
    outputs2 = np.array([[0.1], [-2.0], [3.0], [4.0]])  # last two swapped
    assert np.isclose(lds(scores, masks, outputs2).mean, 1 - 6 * 2 / (4 * 15))


def test_retraining_cache_and_topk_removal(tmp_path):
    from logix.analysis import retrain_on_subsets, topk_removal_test

    contrib = np.array([[5.0, -1.0, 0.5, 2.0, 0.0, -3.0]])  # a "model" whose output adds up examples
    calls = []

    def train_fn(mask):
        calls.append(mask.copy())
        return (contrib * mask).sum(1)

    masks, outputs = retrain_on_subsets(train_fn, 6, n_subsets=8, cache=tmp_path / "gt.npz", progress=False)
    assert masks.shape == (8, 6) and (masks.sum(1) == 3).all() and len(calls) == 8
    assert np.allclose(outputs[:, 0], masks @ contrib[0])
    again_masks, again = retrain_on_subsets(train_fn, 6, n_subsets=8, cache=tmp_path / "gt.npz", progress=False)
    assert len(calls) == 8 and np.array_equal(again, outputs) and np.array_equal(again_masks, masks)
    assert np.isclose(lds(contrib, masks, outputs).mean, 1.0)  # exact scores are perfectly ranked
    result = topk_removal_test(contrib, train_fn, query=0, ks=(2,))
    assert result[2]["top_k_removed"] == -(5.0 + 2.0)
