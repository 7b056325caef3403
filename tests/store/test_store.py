"""Store round trips, chunked reading, lookup by id, and writer error propagation."""

from __future__ import annotations

import pytest
import torch

import logix
from logix.errors import StoreError
from logix.store import Layout, ShardWriter, Store
from logix.store.rundir import LOCK_FILE

LAYOUT = Layout.build([("a", "linear", (2, 3)), ("b", "conv1d", (4, 1))])


def _write(directory, dtype: str, n_shards: int = 3, rows_per: int = 5, ids=None):
    writer = ShardWriter(directory, LAYOUT, dtype, per_token=False)
    writer.set_id_type("str" if ids else "int")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    all_rows, all_ids = [], []
    for s in range(n_shards):
        rows = torch.randn(rows_per, LAYOUT.dim, generator=gen).to(torch_dtype)
        shard_ids = ids[s * rows_per : (s + 1) * rows_per] if ids else list(range(s * rows_per, (s + 1) * rows_per))
        writer.submit(rows, shard_ids, state={"x": torch.tensor([float(s)])})
        all_rows.append(rows)
        all_ids += shard_ids
    writer.close()
    return torch.cat(all_rows), all_ids


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact_for_every_dtype(tmp_path, dtype):
    rows, ids = _write(tmp_path, dtype)
    store = Store(tmp_path)
    assert store.n_rows == 15 and store.ids == ids and store.dtype == rows.dtype
    assert store.n_shards == 3 and store.dim == 10 and store.modules == ["a", "b"]
    got = store.read_all()
    assert got.dtype == rows.dtype and torch.equal(got, rows)


@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 100])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_chunk_size_and_prefetch_do_not_change_rows(tmp_path, chunk, prefetch):
    rows, ids = _write(tmp_path, "float32")
    store = Store(tmp_path)
    chunks = list(store.iter_chunks(chunk_rows=chunk, prefetch=prefetch))
    assert [c.rows.shape[0] for c in chunks[:-1]] == [chunk] * (len(chunks) - 1)  # spans shards
    assert 0 < chunks[-1].rows.shape[0] <= chunk
    assert torch.equal(torch.cat([c.rows for c in chunks]), rows)
    assert [i for c in chunks for i in c.ids] == ids
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


def test_get_by_id_and_module_columns(tmp_path):
    ids = [f"ex-{i}" for i in range(15)]
    rows, _ = _write(tmp_path, "float32", ids=ids)
    store = Store(tmp_path)
    want = ["ex-12", "ex-0", "ex-7"]
    assert torch.equal(store.get(want), rows[[12, 0, 7]])
    assert torch.equal(store.get(want, modules=["b"]), rows[[12, 0, 7]][:, 6:10])
    assert torch.equal(store.module_rows(rows, "a"), rows[:, :6].reshape(15, 2, 3))
    with pytest.raises(KeyError, match="ex-99"):
        store.get(["ex-99"])


def test_writer_errors_surface_in_the_caller(tmp_path):
    writer = ShardWriter(tmp_path, LAYOUT, "float32", per_token=False)
    writer.set_id_type("int")
    writer.submit(torch.zeros(2, LAYOUT.dim), [0, 1])
    writer.flush()

    def broken(job):
        raise OSError("disk full")

    writer._write_shard = lambda final, job: broken(job)
    writer.submit(torch.zeros(2, LAYOUT.dim), [2, 3])
    with pytest.raises(StoreError, match="disk full"):
        writer.flush()
    with pytest.raises(StoreError):
        writer.submit(torch.zeros(2, LAYOUT.dim), [4, 5])
    writer.abort()
    assert Store(tmp_path).ids == [0, 1]  # the committed shard is intact


def test_uncommitted_files_are_invisible_and_cleaned(tmp_path):
    _write(tmp_path, "float32", n_shards=2)
    (tmp_path / ".shard-000002.h5.tmp").write_bytes(b"partial")
    (tmp_path / "shard-000002.h5").write_bytes(b"renamed but never in the manifest")
    assert Store(tmp_path).n_rows == 10
    writer = ShardWriter(tmp_path, LAYOUT, "float32", per_token=False)  # reopen: cleans orphans
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(LOCK_FILE)) == [
        "manifest.json", "shard-000000.h5", "shard-000001.h5", "state-000001.safetensors",
    ]


def test_reopening_with_other_layout_fails(tmp_path):
    _write(tmp_path, "float32", n_shards=1)
    other = Layout.build([("a", "linear", (3, 3))])
    with pytest.raises(StoreError, match="layout"):
        ShardWriter(tmp_path, other, "float32", per_token=False)


def test_run_store_dtypes_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(6, 4)
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        run = logix.init(dtype, config={"store": {"dtype": dtype}, "projection": {"type": "none"}}, root=tmp_path)
        run.watch(model)
        with run(data_id=list(range(6))):
            model(x).pow(2).sum().backward()
        results[dtype] = run.finalize().read_all()
        assert results[dtype].dtype == getattr(torch, dtype)
    assert torch.equal(results["float16"], results["float32"].to(torch.float16))
    assert torch.equal(results["bfloat16"], results["float32"].to(torch.bfloat16))
