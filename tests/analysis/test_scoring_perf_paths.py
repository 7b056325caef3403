"""The fast read path (memory-mapped shards, reused buffers) and the scorer's block-wise float64
work return exactly what the plain paths return."""

from __future__ import annotations

import gc

import h5py
import numpy as np
import pytest
import torch

import logix.analysis.kernels as kernels
import logix.store.mapping as mapping
from logix.analysis import Checkpoint, Preconditioner, compute_influence
from logix.core.statistics import Statistics, eigendecompose
from logix.store import Layout, ShardWriter, Store
from logix.store.format import MANIFEST, read_rank_manifest, write_manifest
from logix.store.integrity import shard_digest

LAYOUT = Layout.build([("a", "linear", (2, 3)), ("b", "linear", (4, 1)), ("c", "linear", (1, 5))])
SHARDS = (3, 300, 1, 40, 260)  # small shards are gathered, the others mapped (align_to_shards)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _write(directory, dtype="float32", shards=SHARDS, per_token=False, seed=0, layout=LAYOUT):
    writer = ShardWriter(directory, layout, dtype, per_token=per_token)
    writer.set_id_type("int")
    gen = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    for n in shards:
        scale = torch.empty(n, 1).log_normal_(0.0, 1.0, generator=gen)
        part = (torch.randn(n, layout.dim, generator=gen) * scale).to(DTYPES[dtype])
        positions = np.arange(start, start + n, dtype=np.int64) % 7 if per_token else None
        writer.submit(part, list(range(start, start + n)), positions=positions)
        rows.append(part)
        start += n
    writer.close()
    return torch.cat(rows)


def _h5_rows(store: Store, modules) -> torch.Tensor:
    """The rows as the plain h5py read of every shard gives them (the previous read path)."""
    parts = []
    for name in store.manifest["shards"]:
        with h5py.File(store.directory / name["file"], "r") as fh:
            raw = fh["rows"][()]
        if store.dtype_name == "bfloat16":
            part = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        else:
            part = torch.from_numpy(raw)
        if modules is not None:
            part = torch.cat([part[:, store.layout.block(m).columns] for m in modules], 1)
        parts.append(part)
    return torch.cat(parts)


def _columns(rows, modules):
    if modules is None:
        return rows
    return torch.cat([rows[:, LAYOUT.block(m).columns] for m in modules], 1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_read_path_returns_the_written_rows(tmp_path, dtype, align, prefetch):
    rows = _write(tmp_path, dtype)
    store = Store(tmp_path)
    assert all(s.offset is not None for s in store._sources())  # the writer's shards are mappable
    n, bounds = sum(SHARDS), np.cumsum((0,) + SHARDS)
    for modules in (None, ["c"], ["c", "a"]):
        expected = _columns(rows, modules)
        assert torch.equal(_h5_rows(store, modules), expected)
        assert torch.equal(store.read_all(modules), expected)
        for chunk in (1, 7, 256, 1000, 5000):
            chunks = list(store.iter_chunks(chunk, modules, prefetch, align_to_shards=align))
            got = torch.cat([c.rows for c in chunks])
            assert got.dtype == DTYPES[dtype] and torch.equal(got, expected), (modules, chunk)
            assert [i for c in chunks for i in c.ids] == list(range(n))
            assert [c.start for c in chunks] == list(np.cumsum([0] + [len(c.ids) for c in chunks[:-1]]))
            sizes = [c.rows.shape[0] for c in chunks]
            assert max(sizes) <= chunk
            if not align:
                assert sizes[:-1] == [chunk] * (len(chunks) - 1)
            else:  # no chunk crosses into or out of a shard of >= min(256, chunk // 2) rows
                big = min(256, max(1, chunk // 2))
                for c in chunks:
                    lo, hi = c.start, c.start + c.rows.shape[0]
                    for s, size in enumerate(SHARDS):
                        if size >= big and lo < bounds[s + 1] and hi > bounds[s]:
                            assert bounds[s] <= lo and hi <= bounds[s + 1], (chunk, lo, hi)


def test_mapped_chunks_are_zero_copy_and_private(tmp_path, monkeypatch):
    rows = _write(tmp_path, "bfloat16")
    store = Store(tmp_path)
    takes = []
    real_take = mapping.Ring.take
    monkeypatch.setattr(mapping.Ring, "take", lambda self, n, w: takes.append(n) or real_take(self, n, w))
    chunks = list(store.iter_chunks(1000, prefetch=2, align_to_shards=True))
    assert takes == [41]  # only the small shards 1 + 40 were gathered into a buffer (3 is one piece)
    for c in chunks:
        c.rows.fill_(1.0)  # copy-on-write: the file is untouched
    assert torch.equal(Store(tmp_path).read_all(), rows)
    assert torch.equal(_h5_rows(store, None), rows)


def test_chunked_or_compressed_shards_fall_back_to_hdf5(tmp_path):
    rows = _write(tmp_path, "bfloat16")
    for name in ("shard-000001.h5", "shard-000003.h5"):  # as another writer could have made them
        with h5py.File(tmp_path / name, "a") as fh:
            data = fh["rows"][()]
            del fh["rows"]
            fh.create_dataset("rows", data=data, chunks=(16, LAYOUT.dim), compression="gzip")
    manifest = read_rank_manifest(tmp_path)  # record the new files, as their writer would have
    manifest["shards"] = [{**e, **shard_digest(tmp_path / e["file"])} for e in manifest["shards"]]
    write_manifest(tmp_path / MANIFEST, manifest)
    store = Store(tmp_path)
    assert [s.offset is None for s in store._sources()] == [False, True, False, True, False]
    for align in (False, True):
        for modules in (None, ["b", "a"]):
            for chunk in (5, 300):
                got = torch.cat([c.rows for c in store.iter_chunks(chunk, modules, 2, align_to_shards=align)])
                assert torch.equal(got, _columns(rows, modules))
    assert torch.equal(store.read_all(), rows)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_kept_chunks_are_never_overwritten_by_buffer_reuse(tmp_path, prefetch):
    rows = _write(tmp_path, "float32", shards=(7,) * 40)  # small shards: every chunk is a copy
    store = Store(tmp_path)
    kept, views = [], []
    for i, c in enumerate(store.iter_chunks(5, prefetch=prefetch)):
        if i % 2:
            kept.append((c.start, c.rows))
        else:  # only a view of the rows survives the chunk
            views.append((c.start, c.rows[:, 2:]))
    for start, r in kept:
        assert torch.equal(r, rows[start : start + r.shape[0]])
    for start, v in views:
        assert torch.equal(v, rows[start : start + v.shape[0], 2:])
    window = []  # a consumer holding the last three chunks
    for c in store.iter_chunks(5, prefetch=prefetch):
        window = [*window[-2:], c]
        for held in window:
            assert torch.equal(held.rows, rows[held.start : held.start + held.rows.shape[0]])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_streaming_consumer_reuses_a_fixed_number_of_buffers(tmp_path, monkeypatch, prefetch):
    rows = _write(tmp_path, "float16", shards=(7,) * 40)
    rings = []
    real_init = mapping.Ring.__init__

    def spy(self, capacity, dtype):
        real_init(self, capacity, dtype)
        rings.append(self)

    monkeypatch.setattr(mapping.Ring, "__init__", spy)
    store = Store(tmp_path)
    total = torch.zeros(LAYOUT.dim, dtype=torch.float64)
    for c in store.iter_chunks(5, prefetch=prefetch):
        total += c.rows.double().sum(0)
    assert torch.allclose(total, rows.double().sum(0))
    assert len(rings) == 1 and rings[0].allocated <= prefetch + 3  # 56 chunks, a few buffers


def test_per_token_positions_and_string_free_labels(tmp_path):
    rows = _write(tmp_path, "float32", per_token=True)
    positions = np.concatenate([np.arange(a, b) % 7 for a, b in zip(np.cumsum((0,) + SHARDS[:-1]), np.cumsum(SHARDS))])
    for preload in (False, True):
        store = Store(tmp_path)
        if preload:
            assert store.ids[:2] == [0, 1]  # chunks then take their labels from the cache
        chunks = list(store.iter_chunks(100, prefetch=2, align_to_shards=True))
        assert np.array_equal(np.concatenate([c.positions for c in chunks]), positions)
        assert torch.equal(torch.cat([c.rows for c in chunks]), rows)
        chunks[0].positions[:] = -1  # a chunk's positions are its own
        assert np.array_equal(store.positions if preload else positions, positions)


# ---- scorer ---------------------------------------------------------------------------


def _kfac_statistics(layout: Layout, n: int) -> Statistics:
    stats, gen = Statistics(), torch.Generator().manual_seed(3)
    for block in layout.blocks:
        for key, k in (("A", block.shape[1]), ("S", block.shape[0])):
            f = torch.randn(k, k, generator=gen, dtype=torch.float64)
            stats.add(block.name, key, (f @ f.T + 0.1 * torch.eye(k, dtype=torch.float64)) * n * 4)
        stats.add(block.name, "tokens", n * 4)
        stats.add(block.name, "examples", n)
    eigendecompose(stats, layout.names)
    stats.freeze()
    return stats


def _oracle(pre, queries, rows, mode):
    """Every score and self-influence, from full float64 tensors."""
    q, t = queries.double(), rows.double()
    if mode == "unit":
        q, t = q / q.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    scores = pre(q) @ t.T
    self_inf = (pre(t) * t).sum(1)
    q_norm = (pre(q) * q).sum(1).sqrt()
    if mode == "relative":
        scores = scores / self_inf.sqrt()[None]
    elif mode == "cosine":
        scores = scores / (q_norm[:, None] * self_inf.sqrt()[None])
    return scores, self_inf


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["identity", "kfac"])
@pytest.mark.parametrize("mode", ["dot", "unit", "relative", "cosine"])
def test_scores_and_self_influence_match_full_float64(tmp_path, monkeypatch, dtype, kind, mode):
    monkeypatch.setattr(kernels, "BLOCK_ELEMS", 7 * LAYOUT.dim)  # several blocks per chunk
    monkeypatch.setattr(kernels, "PRE_BLOCK_ELEMS", 11 * LAYOUT.dim)
    rows = _write(tmp_path, dtype)
    store = Store(tmp_path)
    stats = _kfac_statistics(LAYOUT, len(store)) if kind == "kfac" else None
    pre = Preconditioner(kind, stats, LAYOUT)
    queries = torch.randn(4, LAYOUT.dim, generator=torch.Generator().manual_seed(9))
    want, want_self = _oracle(pre, queries, rows, mode)
    for score_dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        res = compute_influence(Checkpoint(store, queries, pre), mode=mode, top_k=len(store), chunk_rows=150,
                                progress=False, dtype=score_dtype)
        got = torch.zeros_like(want)
        for q in range(len(queries)):
            got[q, res.top_ids[q]] = res.top_scores[q]
        assert (got - want).abs().max() <= tol * want.abs().max(), score_dtype
        assert torch.allclose(res.self_influence, want_self, rtol=1e-12, atol=0)
        top = res.top_scores[:, :3]
        assert torch.equal(top, top.sort(dim=1, descending=True).values)


def test_checkpoints_sharded_differently_still_align(tmp_path):
    a = _write(tmp_path / "a", shards=SHARDS, seed=1)
    b = _write(tmp_path / "b", shards=(300, 300, 4), seed=2)  # same ids, other shards
    queries = torch.randn(3, LAYOUT.dim, generator=torch.Generator().manual_seed(5))
    pre = Preconditioner("identity", None, LAYOUT)
    cps = [Checkpoint(Store(tmp_path / "a"), queries, pre, 0.3), Checkpoint(Store(tmp_path / "b"), queries, pre, 2.0)]
    res = compute_influence(cps, top_k=5, chunk_rows=128, progress=False, dtype=torch.float64)
    full = 0.3 * queries.double() @ a.double().T + 2.0 * queries.double() @ b.double().T
    want = full.topk(5, dim=1)
    assert res.top_ids == want.indices.tolist()
    assert torch.allclose(res.top_scores, want.values, rtol=1e-12)
    assert torch.allclose(res.self_influence, 0.3 * (a.double() ** 2).sum(1) + 2.0 * (b.double() ** 2).sum(1))


def test_keeping_many_mapped_chunks_falls_back_to_copies(tmp_path, monkeypatch):
    rows = _write(tmp_path, "float32", shards=(300,) * 6)
    monkeypatch.setattr(mapping, "MAX_LIVE_MAPS", mapping.live_map_count() + 3)
    store = Store(tmp_path)
    chunks = list(store.iter_chunks(100, prefetch=2, align_to_shards=True))  # 18 chunks, all kept
    assert mapping.live_map_count() <= mapping.MAX_LIVE_MAPS  # each live map holds a file descriptor
    assert torch.equal(torch.cat([c.rows for c in chunks]), rows)
    del chunks
    gc.collect()
    assert mapping.live_map_count() <= mapping.MAX_LIVE_MAPS - 3  # maps are released with their chunks
