"""Covariances, EK-FAC corrections and raw covariance against explicit formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from tests.helpers import TokenModel, per_example_grads, projected, rel_err

N, SEQ = 12, 6


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, SEQ + 1, (N,), generator=gen)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    tokens = torch.randint(1, 11, (N, SEQ), generator=gen)
    labels = torch.randint(0, 4, (N, SEQ), generator=gen)
    return tokens, mask, labels


def _loss(model, tokens, labels, mask):
    logits = model(tokens)
    per_tok = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return (per_tok * mask.reshape(-1)).sum()


def _run(tmp_path, projection, stats, model, tokens, labels, mask, name="s"):
    cfg = {
        "projection": {"type": projection, "rank_in": 3, "rank_out": 2, "seed": 3},
        "capture": {"compute_dtype": "float64"},
        "statistics": {"ekfac": False, **stats},  # only the statistics a test names
        "store": {"dtype": "float32"},  # rows and row-based corrections vs float64 oracles
    }
    run = logix.init(name, config=cfg, root=tmp_path)
    run.watch(model, modules=["fc"])
    for _ in run.plan():
        for lo in range(0, N, 5):
            ids = list(range(lo, min(lo + 5, N)))
            with run(data_id=ids, mask=mask[ids]):
                _loss(model, tokens[ids], labels[ids], mask[ids]).backward()
    run.finalize()
    return run


def _explicit_factors(model, tokens, labels, mask):
    """Full-space A and S of module fc from activations and output gradients (masked tokens)."""
    captured = {}

    def hook(module, inputs, output):
        captured["a"] = inputs[0].detach()
        output.retain_grad()
        captured["out"] = output

    handle = model.fc.register_forward_hook(hook)
    _loss(model, tokens, labels, mask).backward()
    handle.remove()
    model.zero_grad()
    m = mask.bool()
    a = captured["a"][m]
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    g = captured["out"].grad[m]
    return a.T @ a / m.sum(), g.T @ g / m.sum()


def _oracle_grads(model, tokens, labels, mask):
    def single(i):
        n = int(mask[i].sum())
        return _loss(model, tokens[i : i + 1, :n], labels[i : i + 1, :n], mask[i : i + 1, :n])

    return per_example_grads(model, ["fc"], N, single)["fc"]


@pytest.mark.parametrize("projection", ["none", "random"])
def test_kfac_factors_match_explicit_formula(tmp_path, projection):
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, mask, labels = _data()
    run = _run(tmp_path, projection, {"kfac": True}, model, tokens, labels, mask)
    a_full, s_full = _explicit_factors(model, tokens, labels, mask)
    proj = run.projections["fc"]
    a_exp = a_full if proj.p_in is None else proj.p_in.double().T @ a_full @ proj.p_in.double()
    s_exp = s_full if proj.p_out is None else proj.p_out.double().T @ s_full @ proj.p_out.double()
    assert rel_err(run.statistics.mean("fc", "A"), a_exp) < 1e-10
    assert rel_err(run.statistics.mean("fc", "S"), s_exp) < 1e-10
    assert run.statistics.count("fc", "tokens") == float(mask.sum())


@pytest.mark.parametrize("projection", ["none", "random", "pca"])
def test_ekfac_corrections_and_raw_covariance(tmp_path, projection):
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, mask, labels = _data()
    run = _run(tmp_path, projection, {"kfac": True, "ekfac": True, "raw": True}, model, tokens, labels, mask)
    stats = run.statistics
    grads = projected(run, "fc", _oracle_grads(model, tokens, labels, mask))  # (N, k_out, k_in)
    for key in ("A", "S"):
        cov, q, lam = stats.mean("fc", key), stats.raw_sum("fc", f"{key}_evecs"), stats.raw_sum("fc", f"{key}_evals")
        assert rel_err(cov @ q, q * lam) < 1e-10  # stored eigenpairs are those of the factor
    q_a, q_s = stats.raw_sum("fc", "A_evecs"), stats.raw_sum("fc", "S_evecs")
    # random / none: one pass, the corrections come from the stored (float32) rows after it;
    # pca: accumulated in the log pass from the float64 gradients, in the covariance pass's basis
    from_rows = projection != "pca"
    assert run.passes == (["log"] if from_rows else ["covariance", "log"])
    rotated = q_s.T @ (grads.float().double() if from_rows else grads) @ q_a
    assert rel_err(stats.mean("fc", "ekfac"), (rotated**2).mean(0)) < 1e-10
    assert rel_err(stats.mean("fc", "ekfac"), ((q_s.T @ grads @ q_a) ** 2).mean(0)) < 1e-6
    flat = grads.flatten(1)
    assert rel_err(stats.mean("fc", "raw"), flat.T @ flat / N) < 1e-10
    assert stats.count("fc", "examples") == N


def test_pca_projection_spans_top_eigenvectors(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, mask, labels = _data()
    run = _run(tmp_path, "pca", {"kfac": True}, model, tokens, labels, mask)
    assert run.passes == ["covariance", "log"]
    a_full, s_full = _explicit_factors(model, tokens, labels, mask)
    assert rel_err(run.full_statistics.mean("fc", "A"), a_full) < 1e-10
    for cov, p in ((a_full, run.projections["fc"].p_in), (s_full, run.projections["fc"].p_out)):
        evals, evecs = torch.linalg.eigh(cov)
        top = evecs[:, torch.argsort(evals, descending=True)[: p.shape[1]]]
        overlap = (top.T @ p.double()).abs()
        assert torch.allclose(overlap, torch.eye(p.shape[1], dtype=torch.float64), atol=1e-5)
    # the logged rows are exactly the PCA-projected per-example gradients
    grads = projected(run, "fc", _oracle_grads(model, tokens, labels, mask))
    rows = run.store().get(list(range(N))).double().reshape(N, *grads.shape[1:])
    assert rel_err(rows, grads) < 1e-6


def test_finalized_statistics_are_immutable_and_reload_identically(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, mask, labels = _data()
    run = _run(tmp_path, "random", {"kfac": True, "ekfac": True}, model, tokens, labels, mask)
    stats = run.statistics
    before = stats.raw_sum("fc", "A")
    stats.raw_sum("fc", "A").add_(1.0)  # callers receive copies
    assert torch.equal(stats.raw_sum("fc", "A"), before)
    with pytest.raises(logix.LogixError):
        stats.add("fc", "A", torch.zeros_like(before))
    loaded = logix.Statistics.load(run.dir / "statistics" / "log.safetensors")
    assert loaded.frozen
    for key, value in stats.flat().items():
        assert torch.equal(loaded.flat()[key], value)
    again = logix.init("s", config=run.config, root=tmp_path)  # reopening a finished run
    again.watch(model, modules=["fc"])
    assert torch.equal(again.statistics.raw_sum("fc", "ekfac"), stats.raw_sum("fc", "ekfac"))


@pytest.mark.parametrize("projection", ["random", "pca"])
def test_true_fisher_statistics_use_the_sampled_labels_and_rows_the_real_ones(tmp_path, projection):
    """statistics.fisher=true: every statistics pass runs the loop with ``pass_.sample_labels``;
    A, S, EK-FAC corrections and raw covariance then equal the explicit formulas under the
    sampled labels, while the stored rows are the real-label gradients."""
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, mask, labels = _data()
    sampled = torch.randint(0, 4, labels.shape, generator=torch.Generator().manual_seed(9))
    cfg = {"projection": {"type": projection, "rank_in": 3, "rank_out": 2, "seed": 3},
           "capture": {"compute_dtype": "float64"},
           "statistics": {"kfac": True, "ekfac": True, "raw": True, "fisher": "true"},
           "store": {"dtype": "float32"}}  # the rows are compared to autograd gradients
    run = logix.init("tf", config=cfg, root=tmp_path)
    run.watch(model, modules=["fc"])
    seen = []
    for pass_ in run.plan():
        seen.append((pass_.name, pass_.sample_labels, pass_.writes_rows))
        use = sampled if pass_.sample_labels else labels
        for lo in range(0, N, 5):
            ids = list(range(lo, min(lo + 5, N)))
            with run(data_id=ids, mask=mask[ids]):
                _loss(model, tokens[ids], use[ids], mask[ids]).backward()
    run.finalize()
    first = "covariance" if projection == "pca" else "kfac"
    assert seen == [(first, True, False), ("fisher", True, False), ("log", False, True)]
    stats = run.statistics
    proj = run.projections["fc"]
    a_full, s_full = _explicit_factors(model, tokens, sampled, mask)
    _, s_real = _explicit_factors(model, tokens, labels, mask)
    s_exp = proj.p_out.double().T @ s_full @ proj.p_out.double()
    assert rel_err(stats.mean("fc", "S"), s_exp) < 1e-10
    assert rel_err(stats.mean("fc", "S"), proj.p_out.double().T @ s_real @ proj.p_out.double()) > 1e-3
    assert rel_err(stats.mean("fc", "A"), proj.p_in.double().T @ a_full @ proj.p_in.double()) < 1e-10
    fisher_grads = projected(run, "fc", _oracle_grads(model, tokens, sampled, mask))
    q_a, q_s = stats.raw_sum("fc", "A_evecs"), stats.raw_sum("fc", "S_evecs")
    assert rel_err(stats.mean("fc", "ekfac"), ((q_s.T @ fisher_grads @ q_a) ** 2).mean(0)) < 1e-10
    flat = fisher_grads.flatten(1)
    assert rel_err(stats.mean("fc", "raw"), flat.T @ flat / N) < 1e-10
    assert stats.count("fc", "examples") == N
    real_grads = projected(run, "fc", _oracle_grads(model, tokens, labels, mask))
    rows = run.store().get(list(range(N))).double().reshape(N, *real_grads.shape[1:])
    assert rel_err(rows, real_grads) < 1e-6


def test_true_fisher_kfac_only_adds_one_covariance_pass(tmp_path):
    cfg = {"statistics": {"kfac": True, "ekfac": False, "fisher": "true"}}
    assert logix.init("a", config=cfg, root=tmp_path).passes == ["kfac", "log"]
    assert logix.init("b", config={"statistics": {"kfac": True, "ekfac": False}}, root=tmp_path).passes == ["log"]
    cfg = {"statistics": {"kfac": False, "ekfac": False, "raw": True, "fisher": "true"}}
    assert logix.init("c", config=cfg, root=tmp_path).passes == ["fisher", "log"]


def test_fisher_samples_repeat_the_statistics_passes(tmp_path):
    """fisher_samples=2: the statistics passes run the loop twice (a fresh draw each time); the
    factors are the mean over both draws' tokens, the raw covariance over 2N gradients."""
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, mask, labels = _data()
    draws = [torch.randint(0, 4, labels.shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    cfg = {"projection": {"type": "none"}, "capture": {"compute_dtype": "float64"},
           "statistics": {"kfac": True, "raw": True, "fisher": "true", "fisher_samples": 2}}
    run = logix.init("fs", config=cfg, root=tmp_path)
    run.watch(model, modules=["fc"])
    for pass_ in run.plan():
        assert pass_.repeats == (2 if pass_.sample_labels else 1)
        for r in range(pass_.repeats):
            use = draws[r] if pass_.sample_labels else labels
            with run(data_id=list(range(N)), mask=mask):
                _loss(model, tokens, use, mask).backward()
    run.finalize()
    s_both = [_explicit_factors(model, tokens, d, mask)[1] for d in draws]
    assert rel_err(run.statistics.mean("fc", "S"), (s_both[0] + s_both[1]) / 2) < 1e-10
    assert run.statistics.count("fc", "tokens") == 2 * float(mask.sum())
    g = torch.cat([_oracle_grads(model, tokens, d, mask).flatten(1) for d in draws])
    assert rel_err(run.statistics.mean("fc", "raw"), g.T @ g / (2 * N)) < 1e-10
