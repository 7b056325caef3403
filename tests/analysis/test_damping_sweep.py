"""damping_sweep: the LDS of a run's scores at each preconditioner and damping, against retrained models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import logix
from logix.analysis import Damping, damping_sweep, lds, load_checkpoint, retrain_on_subsets
from logix.core.statistics import Statistics
from logix.errors import LogixError, StatisticsError
from logix.store.rundir import statistics_file

N, NQ = 48, 6


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N + NQ, 5, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x[:N], y[:N], x[N:], y[N:]


def _train(mask: np.ndarray, seed: int = 0) -> nn.Module:
    xt, yt, _, _ = _data()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    sel = torch.from_numpy(np.flatnonzero(mask))
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt[sel]), yt[sel]).backward()
        opt.step()
    return net


def _outputs(net: nn.Module) -> np.ndarray:
    _, _, xq, yq = _data()
    with torch.no_grad():
        return -nn.functional.cross_entropy(net(xq), yq, reduction="none").numpy()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run whose train rows are logged in a shuffled order under string ids, and its ground truth."""
    xt, yt, xq, yq = _data()
    net = _train(np.ones(N, dtype=bool))
    run = logix.init("sweep", config={"projection": {"rank_in": 4, "rank_out": 3}, "store": {"dtype": "float32"},
                                      "statistics": {"raw": True}}, root=tmp_path_factory.mktemp("runs"))
    run.watch(net)
    order = np.random.default_rng(1).permutation(N)
    for lo in range(0, N, 16):
        idx = order[lo:lo + 16]
        with run(data_id=[f"ex{i}" for i in idx]):
            nn.functional.cross_entropy(net(xt[idx]), yt[idx], reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=list(range(NQ))):
        nn.functional.cross_entropy(net(xq), yq, reduction="sum").backward()
    run.finalize()
    masks, outputs = retrain_on_subsets(lambda m: _outputs(_train(m)), N, n_subsets=16, progress=False)
    return run.dir, masks, outputs


def _brute_force_lds(run_dir, kind, damping, masks, outputs) -> float:
    """LDS of g_q^T (H + d I)^-1 g_t with H built here from the run's statistics (EK-FAC: the
    eigenbases and corrections; raw: the block covariance) and summed over modules."""
    cp = load_checkpoint(run_dir, "identity")
    stats = Statistics.load(statistics_file(run_dir))
    rows, q = cp.train.read_all().double(), cp.queries.double()
    scores = torch.zeros(q.shape[0], rows.shape[0], dtype=torch.float64)
    for b in cp.train.layout.blocks:
        g, gq = rows[:, b.columns], q[:, b.columns]
        if kind == "raw":
            h = stats.mean(b.name, "raw").double()
        else:
            q_s = stats.raw_sum(b.name, "S_evecs").double()
            q_a = stats.raw_sum(b.name, "A_evecs").double()
            basis = torch.kron(q_s, q_a)  # vec(Q_S^T G Q_A) = kron(Q_S, Q_A)^T vec(G), row-major
            h = basis @ torch.diag(stats.mean(b.name, "ekfac").double().flatten()) @ basis.T
        evals = torch.linalg.eigvalsh(h).clamp_min(0)
        d = damping.value * float(evals.mean()) if damping.relative else damping.value
        scores += gq @ torch.linalg.solve(h + d * torch.eye(len(h), dtype=torch.float64), g.T)
    columns = [cp.train.index_of(f"ex{i}") for i in range(N)]
    return lds(scores[:, columns].numpy(), masks, outputs).mean


def test_each_setting_scores_as_the_brute_force_formula(logged):
    run_dir, masks, outputs = logged
    dampings = [1e-3, 0.1, Damping(10.0), Damping(1e-6, relative=False)]
    sweep = damping_sweep(run_dir, masks, outputs, dampings, ["auto", "raw"], train_ids=[f"ex{i}" for i in range(N)],
                          progress=False)
    assert sweep.preconditioners == ["ekfac"] * 4 + ["raw"] * 4  # auto: the run logged EK-FAC corrections
    expected = [_brute_force_lds(run_dir, kind, d if isinstance(d, Damping) else Damping(d), masks, outputs)
                for kind in ("ekfac", "raw") for d in dampings]
    assert np.allclose(sweep.means, expected, atol=1e-9)
    assert max(expected) - min(expected) > 1e-3  # the settings really differ, so the comparison can fail
    best = int(np.argmax(expected))
    assert sweep.best_index == best
    assert sweep.best_kwargs == {"preconditioner": sweep.preconditioners[best], "damping": sweep.dampings[best]}
    records = sweep.to_records()
    assert [r["best"] for r in records].count(True) == 1 and records[2]["damping"] == "10 relative"
    assert records[5]["preconditioner"] == "raw" and "<- best" in str(sweep)


def test_mismatched_ground_truth_is_refused_with_the_fix(logged):
    run_dir, masks, outputs = logged
    with pytest.raises(LogixError, match="pass train_ids"):  # the run's ids are strings, not 0..n-1
        damping_sweep(run_dir, masks, outputs, [0.1], progress=False)
    ids = [f"ex{i}" for i in range(N)]
    with pytest.raises(LogixError, match="5 columns but .* logged 6 queries"):
        damping_sweep(run_dir, masks, outputs[:, :5], [0.1], train_ids=ids, progress=False)
    with pytest.raises(LogixError, match="47 train_ids for masks over 48"):
        damping_sweep(run_dir, masks, outputs, [0.1], train_ids=ids[:-1], progress=False)
    with pytest.raises(LogixError, match="one row per retrained model"):
        damping_sweep(run_dir, masks[:-1], outputs, [0.1], train_ids=ids, progress=False)
    with pytest.raises(LogixError, match="at least one damping"):
        damping_sweep(run_dir, masks, outputs, [], train_ids=ids, progress=False)
    with pytest.raises(LogixError, match="one preconditioner"):
        damping_sweep(run_dir, masks, outputs, [0.1], [], train_ids=ids, progress=False)
    with pytest.raises(StatisticsError, match="raw_joint=true"):  # the run logged no whole-row covariance
        damping_sweep(run_dir, masks, outputs, [0.1], ["ekfac", "raw-joint"], train_ids=ids, progress=False)


def test_cli_reads_the_retraining_cache_and_prints_the_best(logged, tmp_path, capsys):
    import json

    from logix.cli import main

    run_dir, masks, outputs = logged
    ids = np.array([f"ex{i}" for i in range(N)])
    gt = tmp_path / "gt.npz"
    np.savez(gt, masks=masks, outputs=outputs, train_ids=ids)
    out = tmp_path / "sweep.json"
    assert main(["damping", str(run_dir), str(gt), "--dampings", "0.001", "10", "--preconditioner", "ekfac", "raw",
                 "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    sweep = damping_sweep(run_dir, masks, outputs, [1e-3, 10.0], ["ekfac", "raw"], train_ids=ids.tolist(),
                          progress=False)
    records = json.loads(out.read_text())
    assert [r["lds"] for r in records] == pytest.approx(sweep.means, abs=1e-12)
    kind, value = sweep.best_preconditioner, sweep.best.value
    assert f"best: {kind} at {value:g} relative (logix influence --preconditioner {kind} --damping {value:g})" in printed
    np.savez(tmp_path / "bad.npz", masks=masks)
    assert main(["damping", str(run_dir), str(tmp_path / "bad.npz"), "--quiet"]) == 1
    assert "has no ['outputs']" in capsys.readouterr().err
    assert main(["damping", str(run_dir), str(tmp_path / "missing.npz"), "--quiet"]) == 1
    assert "retrain_on_subsets" in capsys.readouterr().err
