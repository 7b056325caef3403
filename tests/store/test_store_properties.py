"""Property-based: any shard sizes, dtypes and chunk sizes give back exactly what was written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logix.store import Layout, ShardWriter, Store


@settings(max_examples=25, deadline=None)
@given(
    shard_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    blocks=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    chunk=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_any_sharding_round_trips(shard_sizes, blocks, dtype, chunk, seed):
    layout = Layout.build([(f"m{i}", "linear", shape) for i, shape in enumerate(blocks)])
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp), layout, dtype, per_token=False)
        writer.set_id_type("int")
        written, start = [], 0
        for size in shard_sizes:
            rows = torch.randn(size, layout.dim, generator=gen).to(torch_dtype)
            writer.submit(rows, list(range(start, start + size)))
            written.append(rows)
            start += size
        writer.close()
        store = Store(tmp)
        expected = torch.cat(written)
        chunks = list(store.iter_chunks(chunk_rows=chunk))
        assert torch.equal(torch.cat([c.rows for c in chunks]), expected)
        assert store.ids == list(range(start))
        pick = [start - 1, 0]
        assert torch.equal(store.get(pick), expected[pick])
        name = f"m{len(blocks) - 1}"
        assert torch.equal(store.get(pick, modules=[name]), expected[pick][:, layout.block(name).columns])
