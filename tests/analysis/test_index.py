"""The index: exact scores, the exact scan's top-k where the index sees every candidate, high
recall on a clustered store where it does not, and refusal of damaged or stale indexes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from logix.analysis import Index, compute_influence, influence  # noqa: E402
from logix.analysis.influence import Checkpoint  # noqa: E402
from logix.analysis.precondition import Preconditioner  # noqa: E402
from logix.cli import main  # noqa: E402
from logix.errors import LogixError, StoreError  # noqa: E402
from logix.store import Layout, ShardWriter, Store  # noqa: E402
from logix.store.rundir import index_file, index_norms_file, store_dir  # noqa: E402
from tests.reliability.conftest import log_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return log_run(tmp_path_factory.mktemp("index"))


@pytest.mark.parametrize("kind", ["flat", "ivfflat", "ivfsq8", "ivfpq", "hnsw"])
@pytest.mark.parametrize("mode", ["dot", "relative", "cosine", "unit"])
def test_top_k_equals_the_exact_scan(run_dir, kind, mode):
    """With candidates covering the store, every kind returns the exact scan's top-k and scores."""
    Index.build(run_dir, kind=kind, mode=mode, preconditioner="kfac", progress=False)
    exact = influence(run_dir, preconditioner="kfac", mode=mode, top_k=5, progress=False)
    got = influence(run_dir, preconditioner="kfac", mode=mode, top_k=5, use_index=True, rerank=10, nprobe=64)
    assert got.top_ids == exact.top_ids and got.bottom_ids == exact.bottom_ids
    torch.testing.assert_close(got.top_scores, exact.top_scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.bottom_scores, exact.bottom_scores, rtol=1e-5, atol=1e-7)


def test_a_dot_index_serves_every_preconditioner(run_dir):
    Index.build(run_dir, kind="flat", mode="dot", progress=False)
    for pre in ("identity", "kfac"):
        exact = influence(run_dir, preconditioner=pre, top_k=4, progress=False, damping=0.3)
        got = influence(run_dir, preconditioner=pre, top_k=4, use_index=True, damping=0.3)
        assert got.top_ids == exact.top_ids


def test_a_relative_index_refuses_other_settings_and_modes(run_dir):
    Index.build(run_dir, kind="flat", mode="relative", preconditioner="kfac", progress=False)
    with pytest.raises(LogixError, match="built for the kfac preconditioner"):
        influence(run_dir, preconditioner="identity", mode="relative", top_k=3, use_index=True)
    with pytest.raises(LogixError, match="serves mode 'relative', not 'dot'"):
        influence(run_dir, top_k=3, use_index=True)


def test_a_damaged_or_stale_index_is_refused(tmp_path):
    run_dir = log_run(tmp_path / "root")
    Index.build(run_dir, kind="flat", progress=False)
    path = index_file(run_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="index.faiss: its bytes do not match"):
        Index.load(run_dir)
    Index.build(run_dir, kind="flat", progress=False)
    store = store_dir(run_dir)
    manifest = json.loads((store / "manifest.json").read_text())
    writer = ShardWriter(store, Layout.from_json(manifest["layout"]), manifest["dtype"], False)
    writer.submit(torch.zeros(2, manifest["dim"]), ["new0", "new1"])  # the store grows after indexing
    writer.close()
    with pytest.raises(StoreError, match="stale"):
        Index.load(run_dir)


def _clustered_store(directory: Path, n: int, dim: int, seed: int = 0) -> Store:
    """Rows around 64 random directions of very different norms: gradient-like, not isotropic."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, dim, generator=gen) * torch.logspace(0, 1, 64)[:, None]
    layout = Layout.build([(f"m{i}", "linear", (4, dim // 16)) for i in range(4)])
    writer = ShardWriter(directory, layout, "float32", False)
    writer.set_id_type("int")
    for lo in range(0, n, 2048):
        m = min(2048, n - lo)
        pick = torch.randint(0, 64, (m,), generator=gen)
        writer.submit(centers[pick] + 0.5 * torch.randn(m, dim, generator=gen), list(range(lo, lo + m)))
    writer.close()
    return Store(directory)


@pytest.mark.parametrize("kind, share, rerank, want", [("ivfpq", 1 / 8, 10, 0.9), ("ivfsq8", 0.35, 10, 0.9),
                                                      ("ivfpq", 1 / 8, 2, 0.85)])
def test_recall_on_a_store_the_index_does_not_scan(tmp_path, kind, share, rerank, want):
    """20,000 rows, 1/64 of the lists probed, codes at 1/8 (PQ) or 1/4 (SQ8) of the rows' bytes. With
    only 2k candidates the codes' own ranking matters: scored by inner product (0.89 here), not by
    distance between augmented vectors (0.60: the norm coordinate's quantization error)."""
    run_dir = tmp_path / "run"
    store = _clustered_store(store_dir(run_dir), 20_000, 128)
    index = Index.build(run_dir, kind=kind, mode="dot", preconditioner="identity", progress=False)
    assert index.nbytes < store.nbytes() * share
    queries = torch.randn(50, 128, generator=torch.Generator().manual_seed(1)) * 3
    hits = index.search(queries, 10, preconditioner="identity", nprobe=8, rerank=rerank)
    cp = Checkpoint(store, queries, Preconditioner("identity", None, store.layout))
    exact = compute_influence(cp, top_k=10, self_influence=False, progress=False)
    recall = np.mean([len(set(h) & set(e)) / 10 for h, e in zip(hits.index.tolist(), exact.top_index.tolist())])
    assert recall >= want, recall
    rows = store.read_all().to(torch.float64)
    want = (queries.to(torch.float64) @ rows.T).gather(1, hits.index)  # the scores are exact
    torch.testing.assert_close(hits.scores, want, rtol=1e-5, atol=1e-6)  # float32 dot products, as the scan


def test_cli_index_query_and_influence_use_index(run_dir, capsys):
    assert main(["index", str(run_dir), "--kind", "hnsw", "--quiet"]) == 0
    assert "indexed 32 rows" in capsys.readouterr().out
    assert main(["query", str(run_dir), "--top-k", "3", "--opponents"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    exact = influence(run_dir, top_k=3, progress=False)
    assert [r["query_id"] for r in lines] == exact.query_ids
    assert [[p["id"] for p in r["proponents"]] for r in lines] == exact.top_ids
    assert [[p["id"] for p in r["opponents"]] for r in lines] == exact.bottom_ids
    assert main(["influence", str(run_dir), "--use-index", "--top-k", "3", "--quiet"]) == 0
    proc = subprocess.run([sys.executable, "-m", "logix.cli", "query", str(run_dir), "--top-k", "0"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def _unclustered_store(directory: Path, n: int, dim: int, seed: int = 0) -> Store:
    """Isotropic rows with log-normal norms: no cluster structure (as gradients of an untrained model)."""
    gen = torch.Generator().manual_seed(seed)
    layout = Layout.build([(f"m{i}", "linear", (4, dim // 16)) for i in range(4)])
    writer = ShardWriter(directory, layout, "float32", False)
    writer.set_id_type("int")
    writer.submit(torch.randn(n, dim, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen)), list(range(n)))
    writer.close()
    return Store(directory)


def test_graphs_serve_rows_without_clusters_and_recall_says_which_kind_fits(tmp_path):
    """Inverted lists need rows that cluster; on rows without structure a graph walked by inner
    product finds the top-k (4-bit codes: 0.4 of the rows' bytes), and ``Index.recall`` (what
    ``logix index`` reports after a build) measures it against the exact scan."""
    run_dir = tmp_path / "run"
    store = _unclustered_store(store_dir(run_dir), 20_000, 128)
    rows = store.read_all()
    queries = rows[:50] + 0.3 * torch.randn(50, 128, generator=torch.Generator().manual_seed(1))
    cp = Checkpoint(store, queries, Preconditioner("identity", None, store.layout))
    exact = compute_influence(cp, top_k=10, self_influence=False, progress=False).top_index.tolist()
    measured = {}
    for kind in ("ivfpq", "hnsw", "hnswsq4"):
        index = Index.build(run_dir, kind=kind, mode="dot", preconditioner="identity", progress=False)
        hits = index.search(queries, 10, preconditioner="identity")
        measured[kind] = np.mean([len(set(h) & set(e)) / 10 for h, e in zip(hits.index.tolist(), exact)])
        assert index.recall(queries, preconditioner="identity") == pytest.approx(measured[kind])
        want = (queries.to(torch.float64) @ rows.to(torch.float64).T).gather(1, hits.index)
        torch.testing.assert_close(hits.scores, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))  # float32 dots
    assert measured["hnsw"] >= 0.9 and measured["hnswsq4"] >= 0.9 and measured["ivfpq"] < 0.5, measured
    assert index.nbytes < 0.5 * store.nbytes()  # hnswsq4


def test_cli_index_reports_recall_and_warns_when_low(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _unclustered_store(store_dir(run_dir), 5_000, 64)
    assert main(["index", str(run_dir), "--kind", "ivfpq", "--quiet", "--check", "50"]) == 0
    out = capsys.readouterr()
    assert "recall@10 against the exact scan on 50 sampled query rows" in out.out
    assert "try --kind hnsw" in out.err
    assert main(["index", str(run_dir), "--kind", "hnsw", "--quiet", "--check", "50"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_reduced_index_keeps_recall_in_fewer_bytes_and_checks_its_basis(tmp_path):
    """Rows whose energy lies in 16 of 128 directions: a graph over their 16 leading coordinates
    (the basis saved beside the index, checksummed) finds the same top-k in a fraction of the bytes."""
    gen = torch.Generator().manual_seed(0)
    run_dir = tmp_path / "run"
    layout = Layout.build([(f"m{i}", "linear", (4, 8)) for i in range(4)])
    writer = ShardWriter(store_dir(run_dir), layout, "float32", False)
    writer.set_id_type("int")
    mix = torch.linalg.qr(torch.randn(128, 128, generator=gen))[0][:, :16]
    rows = (torch.randn(20_000, 16, generator=gen) * torch.exp(torch.randn(20_000, 1, generator=gen))) @ mix.T
    writer.submit(rows + 0.01 * torch.randn(20_000, 128, generator=gen), list(range(20_000)))
    writer.close()
    full = Index.build(run_dir, kind="hnsw", mode="dot", preconditioner="identity", progress=False)
    full_bytes, full_recall = full.nbytes, full.recall(preconditioner="identity")
    reduced = Index.build(run_dir, kind="hnsw", mode="dot", preconditioner="identity", reduce=16, progress=False)
    assert reduced.basis.shape == (128, 16) and reduced.meta["width"] == 16
    assert reduced.nbytes < 0.5 * full_bytes
    assert reduced.recall(preconditioner="identity") >= min(0.95, full_recall - 0.02)
    basis_file = index_norms_file(run_dir)
    data = bytearray(basis_file.read_bytes())
    data[-3] ^= 0x01
    basis_file.write_bytes(bytes(data))
    with pytest.raises(StoreError):
        Index.load(run_dir)
    with pytest.raises(LogixError, match="reduce=128 must be between"):
        Index.build(run_dir, kind="ivfpq", reduce=128, progress=False)


def test_auto_keeps_ivfpq_on_clustered_rows_and_switches_to_a_reduced_graph_otherwise(tmp_path):
    """``kind="auto"`` (the default) measures ivfpq's recall@10 on sampled rows and, under 0.9,
    builds the 4-bit graph over all coordinates instead, recording both recalls."""
    clustered = tmp_path / "clustered"
    _clustered_store(store_dir(clustered), 20_000, 128)
    index = Index.build(clustered, mode="dot", preconditioner="identity", progress=False)
    assert index.kind.value == "ivfpq" and list(index.meta["choice"]["recall@10"]) == ["ivfpq"]
    assert index.meta["choice"]["recall@10"]["ivfpq"] >= 0.9
    plain = tmp_path / "plain"
    _unclustered_store(store_dir(plain), 20_000, 128)
    index = Index.build(plain, mode="dot", preconditioner="identity", progress=False)
    measured = index.meta["choice"]["recall@10"]
    assert index.kind.value == "hnswsq4" and index.meta["reduce"] is None
    assert measured["ivfpq"] < 0.9 <= measured["hnswsq4"], measured
    assert Index.load(plain).meta["choice"] == index.meta["choice"]  # recorded in index.json


def test_the_lists_k_means_goes_to_the_gpus_faiss_sees(tmp_path, monkeypatch):
    """faiss-gpu's count of GPUs decides where the lists' k-means runs (here faked: faiss-cpu sees
    none); gpu=False keeps it on the CPU; gpu=True without a GPU names the package to install."""
    import faiss

    run_dir = tmp_path / "run"
    store = _clustered_store(store_dir(run_dir), 5_000, 64)
    asked = []
    real = faiss.Kmeans

    def kmeans(*args, gpu=False, **kw):
        asked.append(gpu)
        return real(*args, **kw)

    monkeypatch.setattr(faiss, "Kmeans", kmeans)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    index = Index.build(run_dir, kind="ivfpq", mode="dot", preconditioner="identity", progress=False)
    Index.build(run_dir, kind="ivfflat", mode="dot", preconditioner="identity", gpu=False, progress=False)
    assert asked == [2, False]
    assert len(index) == store.n_rows and index.recall(preconditioner="identity", sample=50) >= 0.9
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(LogixError, match="install faiss-gpu"):
        Index.build(run_dir, kind="ivfpq", gpu=True, progress=False)


def test_auto_falls_back_to_the_exact_scan_on_a_small_store_neither_kind_serves(tmp_path, monkeypatch, capfd):
    """Neither approximate kind reaching 0.9 (faked here) on rows that fit 1 GiB: ``auto`` keeps the
    exact scan, records both recalls, and faiss is not asked for more centroids than the rows train
    (PQ codes of 2**nbits centroids need 39 rows each: no warnings on a 3,000-row store)."""
    run_dir = tmp_path / "run"
    _clustered_store(store_dir(run_dir), 3_000, 64)
    index = Index.build(run_dir, kind="ivfpq", mode="dot", preconditioner="identity", progress=False)
    assert 2 ** index.meta["params"]["nbits"] * 39 <= 3_000
    assert "please provide at least" not in capfd.readouterr().err
    monkeypatch.setattr(Index, "recall", lambda self, **kw: {"ivfpq": 0.5, "hnswsq4": 0.6}[self.kind.value])
    index = Index.build(run_dir, mode="dot", preconditioner="identity", progress=False)
    assert index.kind.value == "flat" and index.meta["choice"]["recall@10"] == {"ivfpq": 0.5, "hnswsq4": 0.6}


def test_an_index_without_its_basis_file_and_bad_build_options_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _unclustered_store(store_dir(run_dir), 2_000, 64)
    Index.build(run_dir, kind="hnsw", mode="dot", preconditioner="identity", reduce=8, progress=False)
    index_norms_file(run_dir).unlink()  # the reduced basis the queries need
    with pytest.raises(StoreError, match="lacks the rows' norms / the reduced basis"):
        Index.load(run_dir)
    with pytest.raises(LogixError, match="needs a concrete kind"):
        Index.build_kind(run_dir, "auto")
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(run_dir), "--check", "-1"])
    assert exit_info.value.code == 2 and "--check: must be an integer >= 0, got -1" in capsys.readouterr().err
