"""Asymmetric preconditioning: queries preconditioned in full space, then projected.

Oracles: full-dimension EK-FAC computed by hand from autograd per-example gradients; the
unprojected run as the reference for full-rank orthogonal (PCA) projections; and the explicit
``(P^T H^-1 g_q) . (P^T g_t)`` formula for a random projection.
"""

from __future__ import annotations

import h5py
import pytest
import torch
from torch import nn

import logix
from logix.analysis import (
    Damping,
    compute_influence,
    influence,
    load_asymmetric_checkpoint,
    load_checkpoint,
)
from logix.errors import LogixError, StatisticsError
from tests.helpers import per_example_grads, rel_err

N, NQ, SEQ, VOCAB = 8, 3, 8, 23
TYPES = ["linear", "conv1d"]


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg).double().eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N + NQ, SEQ), generator=torch.Generator().manual_seed(1))


def _loss(model, tokens) -> torch.Tensor:
    logits = model(input_ids=tokens).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum")


def _log_lm(tmp_path, name, projection="none", rank=4, raw=False):
    model, tokens = _gpt2(), _tokens()
    proj = {"type": projection} if projection == "none" else {"type": projection, "rank_in": rank,
                                                               "rank_out": rank, "seed": 5}
    cfg = {"projection": proj, "capture": {"compute_dtype": "float64", "types": TYPES},
           "statistics": {"kfac": True, "ekfac": True, "raw": raw, "raw_max_dim": 4096}, "store": {"dtype": "float32"}}
    run = logix.init(name, config=cfg, root=tmp_path)
    run.watch(model)
    for _ in run.plan():
        for lo in range(0, N, 3):
            ids = list(range(lo, min(lo + 3, N)))
            model.zero_grad(set_to_none=True)
            with run(data_id=ids):
                _loss(model, tokens[ids]).backward()
    run.finalize()
    with run.log_queries(data_id=list(range(NQ))):
        _loss(model, tokens[N:]).backward()
    run.finalize()
    return run, model, tokens


def _scores(cp, tmp_path) -> torch.Tensor:
    path = tmp_path / "scores.h5"
    compute_influence(cp, top_k=1, scores_path=path, self_influence=False, progress=False, dtype=torch.float64)
    with h5py.File(path) as fh:
        return torch.from_numpy(fh["scores"][()]).double()


def _autograd(model, tokens, names):
    grads = per_example_grads(model, names, N + NQ, lambda i: _loss(model, tokens[i : i + 1]))
    return {n: g[:N] for n, g in grads.items()}, {n: g[N:] for n, g in grads.items()}


def _ekfac_inverse(stats, name, train_grads, damping=0.1):
    """``(H_ekfac + d)^-1`` of one module, by hand: corrections from the autograd gradients."""
    q_a = stats.raw_sum(name, "A_evecs").double()
    q_s = stats.raw_sum(name, "S_evecs").double()
    corr = ((q_s.T @ train_grads @ q_a) ** 2).mean(0)
    d = damping * float(corr.mean())
    return lambda v: q_s @ ((q_s.T @ v @ q_a) / (corr + d)) @ q_a.T


def test_unprojected_ekfac_on_gpt2_equals_full_dimension_ekfac_by_hand(tmp_path):
    run, model, tokens = _log_lm(tmp_path, "none")
    names = run.layout.names
    assert "lm_head" in names and len(names) == 2 * 4 + 1  # every Linear / Conv1D module
    gt, gq = _autograd(model, tokens, names)
    expected = torch.zeros(NQ, N, dtype=torch.float64)
    for name in names:
        inv = _ekfac_inverse(run.statistics, name, gt[name])
        expected += torch.einsum("qij,tij->qt", inv(gq[name]), gt[name])
    got = _scores(load_checkpoint(run.dir, "ekfac", Damping(0.1)), tmp_path)
    assert rel_err(got, expected) < 1e-5  # rows are stored as float32


def test_asymmetric_without_projection_equals_full_ekfac(tmp_path):
    run, _, _ = _log_lm(tmp_path, "none")
    for damping in (Damping(0.1), Damping(1e-3, relative=False)):
        full = _scores(load_checkpoint(run.dir, "ekfac", damping), tmp_path)
        asym = _scores(load_asymmetric_checkpoint(run.dir, run.dir, "ekfac", damping), tmp_path)
        assert rel_err(asym, full) < 1e-12
        assert full.abs().max() > 0


def test_asymmetric_projected_equals_explicit_formula(tmp_path):
    full_run, model, tokens = _log_lm(tmp_path, "none")
    run, _, _ = _log_lm(tmp_path, "rand", "random", rank=3)
    names = run.layout.names
    gt, gq = _autograd(model, tokens, names)
    expected = torch.zeros(NQ, N, dtype=torch.float64)
    for name in names:
        proj = run.projections[name]
        p_in, p_out = proj.p_in.double(), proj.p_out.double()
        inv = _ekfac_inverse(full_run.statistics, name, gt[name])
        pq = p_out.T @ inv(gq[name]) @ p_in  # P^T H^-1 g_q, preconditioned in full space
        pt = p_out.T @ gt[name] @ p_in  # P^T g_t
        expected += torch.einsum("qij,tij->qt", pq, pt)
    got = _scores(load_asymmetric_checkpoint(run.dir, full_run.dir, "ekfac", Damping(0.1)), tmp_path)
    assert rel_err(got, expected) < 1e-5
    # not what the symmetric projected EK-FAC gives
    sym = _scores(load_checkpoint(run.dir, "ekfac", Damping(0.1)), tmp_path)
    assert rel_err(sym, expected) > 1e-3
    # the config-level entry point gives the same scores
    result = influence(run.dir, preconditioner="ekfac", damping=Damping(0.1), full_space_run=full_run.dir,
                       top_k=N, progress=False, self_influence=False, dtype=torch.float64)
    top = torch.gather(got, 1, torch.tensor([[int(i) for i in row] for row in result.top_ids]))
    assert rel_err(result.top_scores, top) < 1e-6


# ---- full-rank orthogonal projection: every preconditioner as unprojected --------------------
D_IN, HIDDEN, C, M = 4, 5, 3, 24


def _log_mlp(tmp_path, name, projection):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M + NQ, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (M + NQ,), generator=gen)
    proj = {"type": projection}
    if projection == "pca":  # full rank per side: an orthogonal (square) projection
        proj["ranks"] = {"0": [D_IN + 1, HIDDEN], "2": [HIDDEN + 1, C]}
    cfg = {"projection": proj, "capture": {"compute_dtype": "float64"},
           "statistics": {"kfac": True, "ekfac": True, "raw": True, "raw_joint": True}, "store": {"dtype": "float32"}}
    run = logix.init(name, config=cfg, root=tmp_path)
    run.watch(model)
    for _ in run.plan():
        for lo in range(0, M, 7):
            ids = list(range(lo, min(lo + 7, M)))
            with run(data_id=ids):
                nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=list(range(NQ))):
        nn.functional.cross_entropy(model(x[M:]), y[M:], reduction="sum").backward()
    run.finalize()
    return run


def test_full_rank_orthogonal_projection_matches_unprojected_for_every_preconditioner(tmp_path):
    none, pca = _log_mlp(tmp_path, "none", "none"), _log_mlp(tmp_path, "pca", "pca")
    p = pca.projections["0"].p_in.double()
    assert rel_err(p.T @ p, torch.eye(p.shape[1], dtype=torch.float64)) < 1e-6  # orthogonal, square
    for kind in ("identity", "raw", "kfac", "ekfac", "raw-joint"):
        for damping in (Damping(0.1), Damping(1.0)):
            full = _scores(load_checkpoint(none.dir, kind, damping), tmp_path)
            projected = _scores(load_checkpoint(pca.dir, kind, damping), tmp_path)
            assert rel_err(projected, full) < 1e-4, (kind, damping)
    for kind in ("identity", "raw", "kfac", "ekfac"):
        full = _scores(load_checkpoint(none.dir, kind), tmp_path)
        asym = _scores(load_asymmetric_checkpoint(pca.dir, none.dir, kind), tmp_path)
        assert rel_err(asym, full) < 1e-5, kind


def test_mismatched_runs_and_modes_are_rejected(tmp_path):
    mlp = _log_mlp(tmp_path, "none", "none")
    lm, _, _ = _log_lm(tmp_path, "lm")
    with pytest.raises(StatisticsError, match="same model"):
        load_asymmetric_checkpoint(lm.dir, mlp.dir)
    with pytest.raises(StatisticsError, match="raw-joint"):
        load_asymmetric_checkpoint(mlp.dir, mlp.dir, "raw-joint")
    with pytest.raises(LogixError, match="dot"):
        influence(mlp.dir, "ekfac", full_space_run=mlp.dir, mode="cosine", progress=False)


def test_cli_full_space_run_and_config_switch(tmp_path):
    import json

    from logix.cli import main
    from logix.config import AnalysisConfig
    from logix.errors import ConfigError

    full_run, _, _ = _log_lm(tmp_path, "none")
    run, _, _ = _log_lm(tmp_path, "rand", "random", rank=3)
    out = tmp_path / "out"
    main(["influence", str(run.dir), "--preconditioner", "ekfac", "--damping", "0.1", "--top-k", str(N),
          "--full-space-run", str(full_run.dir), "--save-scores", "--out", str(out), "--quiet"])
    with h5py.File(out / "scores.h5") as fh:
        got = torch.from_numpy(fh["scores"][()]).double()
    expected = _scores(load_asymmetric_checkpoint(run.dir, full_run.dir, "ekfac", Damping(0.1)), tmp_path)
    assert rel_err(got, expected) < 1e-6
    assert len((out / "influence.jsonl").read_text().splitlines()) == NQ
    assert json.loads((out / "influence.jsonl").read_text().splitlines()[0])["query_id"] == 0
    with pytest.raises(ConfigError, match="dot"):
        AnalysisConfig(full_space_run=str(full_run.dir), mode="cosine")
    with pytest.raises(ConfigError, match="string"):
        AnalysisConfig(full_space_run=3)


def test_job_with_full_space_run_is_refused_before_any_work(tmp_path):
    from logix.errors import ConfigError
    from logix.jobs.attribution import AttributionJob

    job = AttributionJob({"root": str(tmp_path), "analysis": {"full_space_run": str(tmp_path / "full")}}, progress=False)
    with pytest.raises(ConfigError, match="logix influence"):
        job.run()
    assert not (tmp_path / "job").exists()
