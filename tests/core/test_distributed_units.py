"""In-process pieces of the distributed design: per-rank store writers merged by the reader,
row ranges, the part-wise resumable scorer, data sharding and wrapped-model names."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import logix
from logix.analysis import Checkpoint, Preconditioner, compute_influence
from logix.analysis.sharded import plan_parts, sharded_influence
from logix.core.distributed import Dist, canonical_name, shard_indices, split_evenly, unwrap_model
from logix.errors import LogixError, StoreError
from logix.store import Layout, ShardWriter, Store
from logix.store.format import manifest_name, owns, read_manifest
from logix.store.rundir import LOCK_FILE, part_file
from logix.store.writer import drop_rows

LAYOUT = Layout.build([("a", "linear", (2, 3)), ("b", "linear", (1, 2))])  # dim 8


def write(directory, rank, batches, layout=LAYOUT, dtype="float32"):
    writer = ShardWriter(directory, layout, dtype, per_token=False, rank=rank)
    writer.set_id_type("str")
    for rows, ids in batches:
        writer.submit(rows, ids)
    writer.close()


def batch(prefix, lo, hi, seed=0):
    gen = torch.Generator().manual_seed(seed + lo)
    return torch.randn(hi - lo, LAYOUT.dim, generator=gen), [f"{prefix}{i}" for i in range(lo, hi)]


def test_rank_writers_merge_into_one_logical_store(tmp_path):
    d = tmp_path / "store"
    b0 = [batch("x", 0, 4), batch("x", 4, 6)]
    b1 = [batch("y", 0, 3, 1), batch("y", 3, 8, 1)]
    write(d, 1, b1)  # rank 1 may commit before rank 0 exists
    assert Store(d).ids == [f"y{i}" for i in range(8)]
    write(d, 0, b0)
    store = Store(d)
    assert store.manifest["ranks"] == [0, 1]
    assert store.ids == [f"x{i}" for i in range(6)] + [f"y{i}" for i in range(8)]
    expected = torch.cat([r for r, _ in b0 + b1])
    torch.testing.assert_close(store.read_all(), expected, rtol=0, atol=0)
    torch.testing.assert_close(store.get(["y5", "x1"]), expected[[6 + 5, 1]], rtol=0, atol=0)
    chunks = list(store.iter_chunks(5))
    torch.testing.assert_close(torch.cat([c.rows for c in chunks]), expected, rtol=0, atol=0)
    assert sorted(n for n in os.listdir(d) if not n.startswith(LOCK_FILE)) == sorted([
        "manifest.json", "manifest.rank-00001.json", "shard-000000.h5", "shard-000001.h5",
        "shard-r00001-000000.h5", "shard-r00001-000001.h5"])


def test_a_reopened_writer_cleans_only_its_own_files(tmp_path):
    d = tmp_path / "store"
    write(d, 0, [batch("x", 0, 4)])
    write(d, 1, [batch("y", 0, 4)])
    # another rank's shard in flight and rank 0's own leftovers of a crash
    (d / ".shard-r00001-000001.h5.tmp").write_bytes(b"being written by rank 1")
    (d / ".shard-000001.h5.tmp").write_bytes(b"rank 0 crashed here")
    (d / "shard-000007.h5").write_bytes(b"never committed by rank 0")
    ShardWriter(d, LAYOUT, "float32", per_token=False, rank=0).close()
    names = set(os.listdir(d))
    assert ".shard-r00001-000001.h5.tmp" in names and "shard-r00001-000000.h5" in names
    assert ".shard-000001.h5.tmp" not in names and "shard-000007.h5" not in names
    assert Store(d).n_rows == 8


def test_ownership_of_files():
    assert owns(0, "shard-000003.h5") and owns(0, ".shard-000003.h5.tmp") and owns(0, "state-000001.safetensors")
    assert owns(0, ".manifest.json.tmp") and not owns(0, "manifest.rank-00001.json")
    assert not owns(0, "shard-r00001-000003.h5") and owns(1, "shard-r00001-000003.h5")
    assert owns(1, ".manifest.rank-00001.json.tmp") and not owns(2, "shard-r00001-000003.h5")
    assert manifest_name(0) == "manifest.json" and manifest_name(3) == "manifest.rank-00003.json"


def test_ranks_with_different_layouts_are_refused(tmp_path):
    d = tmp_path / "store"
    write(d, 0, [batch("x", 0, 2)])
    other = Layout.build([("a", "linear", (2, 4))])
    write(d, 1, [(torch.zeros(2, 8), ["y0", "y1"])], layout=other)
    with pytest.raises(StoreError, match="rank 1 wrote a different layout"):
        read_manifest(d)


def test_drop_rows_rewrites_shards_and_keeps_the_rest(tmp_path):
    d = tmp_path / "store"
    b = [batch("x", 0, 4), batch("x", 4, 8)]
    write(d, 1, b)
    removed = drop_rows(d, 1, {"x1", "x2", "x6"}, per_token=False)
    assert removed == 3
    store = Store(d)
    assert store.ids == ["x0", "x3", "x4", "x5", "x7"]
    full = torch.cat([r for r, _ in b])
    torch.testing.assert_close(store.read_all(), full[[0, 3, 4, 5, 7]], rtol=0, atol=0)
    assert len([n for n in os.listdir(d) if n.endswith(".h5")]) == 2  # old shards deleted
    write(d, 1, [batch("x", 8, 10)])  # a later commit gets a fresh shard name
    assert Store(d).ids[-2:] == ["x8", "x9"]


@pytest.mark.parametrize("align", [False, True])
def test_row_ranges_read_exactly_those_rows(tmp_path, align):
    d = tmp_path / "store"
    write(d, 0, [batch("x", 0, 300), batch("x", 300, 305), batch("x", 305, 700)])
    store = Store(d)
    full = store.read_all()
    for lo, hi, chunk in [(0, 700, 64), (10, 11, 4), (250, 310, 7), (299, 301, 300), (305, 700, 128), (700, 700, 5)]:
        chunks = list(store.iter_chunks(chunk, start=lo, stop=hi, align_to_shards=align))
        rows = torch.cat([c.rows for c in chunks]) if chunks else torch.zeros(0, LAYOUT.dim)
        torch.testing.assert_close(rows, full[lo:hi], rtol=0, atol=0)
        starts = list(np.cumsum([lo] + [c.rows.shape[0] for c in chunks]))[:-1]
        assert [c.start for c in chunks] == starts
        assert sum((c.ids for c in chunks), []) == store.ids[lo:hi]
    with pytest.raises(ValueError, match="outside"):
        list(store.iter_chunks(8, start=5, stop=701))


def _checkpoint(tmp_path, n=53, nq=4):
    d = tmp_path / "train"
    write(d, 0, [batch("t", 0, 20), batch("t", 20, n)])
    gen = torch.Generator().manual_seed(9)
    queries = torch.randn(nq, LAYOUT.dim, generator=gen)
    return Checkpoint(Store(d), queries, Preconditioner("identity", None, LAYOUT))


def test_compute_influence_on_a_row_range_is_a_slice_of_the_whole(tmp_path):
    cp = _checkpoint(tmp_path)
    whole = compute_influence(cp, top_k=60, scores_path=tmp_path / "all.h5", progress=False)
    part = compute_influence(cp, top_k=5, scores_path=tmp_path / "part.h5", progress=False, rows=(11, 30))
    with h5py.File(tmp_path / "all.h5") as a, h5py.File(tmp_path / "part.h5") as b:
        np.testing.assert_array_equal(b["scores"][()], a["scores"][:, 11:30])
    torch.testing.assert_close(part.self_influence, whole.self_influence[11:30])
    assert part.top_index.min() >= 11 and part.top_index.max() < 30
    for q in range(4):
        inside = [i for i in whole.top_ids[q] if 11 <= int(i[1:]) < 30][:5]
        assert part.top_ids[q] == inside


@pytest.mark.parametrize("mode", ["dot", "cosine", "relative"])
def test_part_wise_scoring_equals_one_pass_and_resumes_only_missing_parts(tmp_path, mode):
    cp = _checkpoint(tmp_path)
    ref = compute_influence(cp, mode=mode, top_k=6, scores_path=tmp_path / "ref.h5", progress=False)
    work = tmp_path / "work"
    res = sharded_influence(cp, work, mode=mode, top_k=6, part_rows=10, save_scores=True, progress=False)
    assert res.top_ids == ref.top_ids and res.bottom_ids == ref.bottom_ids
    torch.testing.assert_close(res.top_scores, ref.top_scores, rtol=1e-6, atol=1e-6)  # float32 GEMM chunks
    torch.testing.assert_close(res.self_influence, ref.self_influence)
    with h5py.File(tmp_path / "ref.h5") as a, h5py.File(res.scores_path) as b:  # float32 GEMMs of other shapes
        np.testing.assert_allclose(b["scores"][()], a["scores"][()], rtol=1e-5, atol=1e-6 * np.abs(a["scores"][()]).max())
    assert len(plan_parts(53, 10)) == 6
    # an interruption: parts 2 and 4 lost their results; only they are scored again
    stamps = {i: part_file(work, i).stat().st_mtime_ns for i in range(6)}
    for i in (2, 4):
        part_file(work, i).unlink()
    again = sharded_influence(cp, work, mode=mode, top_k=6, part_rows=10, save_scores=True, progress=False)
    assert again.top_ids == ref.top_ids
    for i in (0, 1, 3, 5):
        assert part_file(work, i).stat().st_mtime_ns == stamps[i]
    # a different job in the same folder is refused unless overwritten
    with pytest.raises(LogixError, match="another scoring job"):
        sharded_influence(cp, work, mode=mode, top_k=3, part_rows=10, progress=False)
    other = sharded_influence(cp, work, mode=mode, top_k=3, part_rows=10, progress=False, overwrite=True)
    assert other.top_ids == [row[:3] for row in ref.top_ids]
    assert json.loads((work / "job.json").read_text())["top_k"] == 3


def test_shard_indices_cover_every_example_once():
    for n in (0, 1, 7, 37, 100):
        for world in (1, 2, 3, 8):
            parts = [list(shard_indices(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [list(p) for p in split_evenly(list(range(5)), 2)] == [[0, 1], [2, 3, 4]]


def test_wrapped_module_names_are_the_plain_models():
    assert canonical_name("_fsdp_wrapped_module.h.0._fsdp_wrapped_module.attn.c_attn") == "h.0.attn.c_attn"
    assert canonical_name("h.0._checkpoint_wrapped_module.mlp") == "h.0.mlp"
    assert canonical_name("_orig_mod.fc") == "fc"
    model = nn.Sequential(nn.Linear(3, 2))
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert Dist.current() == Dist(0, 1) and not Dist().active


def test_ddp_wrapped_model_logs_under_the_plain_names(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        run = logix.init("ddp", config={"projection": {"type": "none"}}, root=tmp_path)
        assert run.dist.world_size == 1 and not run.dist.active
        assert run.watch(ddp) == ["0", "2"]
        x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
        with run(data_id=list(range(5))):
            nn.functional.cross_entropy(ddp(x), y, reduction="sum").backward()
        store = run.finalize()
        assert store.layout.names == ["0", "2"] and store.n_rows == 5
    finally:
        dist.destroy_process_group()


def test_checkpoints_with_different_shard_sizes_score_like_each_alone(tmp_path):
    """Zero-copy chunks follow each store's shards; stores sharded differently fall back to
    fixed-size chunks so the checkpoints' rows stay paired."""
    gen = torch.Generator().manual_seed(3)
    rows_a, rows_b = torch.randn(50, LAYOUT.dim, generator=gen), torch.randn(50, LAYOUT.dim, generator=gen)
    ids = [f"t{i}" for i in range(50)]
    write(tmp_path / "a", 0, [(rows_a[:20], ids[:20]), (rows_a[20:], ids[20:])])
    write(tmp_path / "b", 0, [(rows_b[lo:lo + 7], ids[lo:lo + 7]) for lo in range(0, 50, 7)])
    queries = torch.randn(3, LAYOUT.dim, generator=gen)
    pre = Preconditioner("identity", None, LAYOUT)
    a = Checkpoint(Store(tmp_path / "a"), queries, pre, weight=0.25)
    b = Checkpoint(Store(tmp_path / "b"), queries, pre, weight=0.75)
    both = compute_influence([a, b], top_k=50, chunk_rows=16, progress=False, dtype=torch.float64)
    expected = queries.double() @ (0.25 * rows_a.double() + 0.75 * rows_b.double()).T
    order = expected.argsort(dim=1, descending=True)
    assert both.top_ids == [[ids[j] for j in row] for row in order.tolist()]
    torch.testing.assert_close(both.top_scores, expected.gather(1, order))


def test_part_wise_per_module_breakdown_equals_one_pass(tmp_path):
    cp = _checkpoint(tmp_path)
    ref = compute_influence(cp, mode="relative", top_k=4, per_module=True, progress=False, dtype=torch.float64)
    res = sharded_influence(cp, tmp_path / "work", mode="relative", top_k=4, part_rows=9, per_module=True,
                            self_influence=False, progress=False, dtype=torch.float64)
    assert res.top_ids == ref.top_ids and res.self_influence is None
    for name in ("a", "b"):
        torch.testing.assert_close(res.per_module[name], ref.per_module[name])
