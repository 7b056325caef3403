"""Quantized stores (``store.dtype: int8 / int4``): the rounding bound, exact round trips of
codes, every read path, scoring against the brute force on the dequantized rows, and the
distributed row rewrite."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import logix
from logix.analysis import Checkpoint, compute_influence, load_checkpoint
from logix.analysis.precondition import Preconditioner
from logix.analysis.sharded import sharded_influence
from logix.data import load_tokenizer
from logix.jobs.attribution import AttributionJob
from logix.store import Layout, ShardWriter, Store
from logix.store.quant import dequantize, pack_int4, q_max, quantize, unpack_int4
from logix.store.writer import drop_rows
from tests.helpers import rel_err

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
# block sizes 15 (odd: int4 rows pack across block boundaries), 1, 6
LAYOUT = Layout.build([("a", "linear", (3, 5)), ("b", "linear", (1, 1)), ("c", "conv1d", (2, 3))])


def _rows(n: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0] * 15 + [300.0] + [1e-4] * 6)  # modules with very different ranges
    rows = torch.randn(n, LAYOUT.dim, generator=gen) * scale
    rows[3, 16:] = 0.0  # an all-zero block
    return rows


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_rounding_error_is_at_most_half_a_step_of_each_blocks_own_scale(dtype):
    rows = _rows()
    codes, scales = quantize(rows, LAYOUT, dtype)
    back = dequantize(codes, scales, LAYOUT, dtype)
    top = q_max(dtype)
    for b, block in enumerate(LAYOUT.blocks):
        x = rows[:, block.columns].numpy()
        step = np.abs(x).max(axis=1) / top
        np.testing.assert_allclose(scales[:, b], step, rtol=1e-6)
        err = np.abs(back[:, block.columns] - x)
        assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
        # the largest entry of each row is exact up to float rounding: it sits on the grid
        i = np.abs(x).argmax(axis=1)
        np.testing.assert_allclose(back[np.arange(len(x)), block.columns.start + i], x[np.arange(len(x)), i], rtol=1e-6)
    assert (back[3, 16:] == 0).all()  # a zero block stays zero (scale 0, no division by it)
    assert codes.nbytes == rows.shape[0] * ((LAYOUT.dim + 1) // 2 if dtype == "int4" else LAYOUT.dim)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_values_on_the_grid_round_trip_exactly(dtype):
    top = q_max(dtype)
    codes = torch.randint(-top, top + 1, (5, LAYOUT.dim), generator=torch.Generator().manual_seed(0))
    codes[:, 0] = top  # every block attains the top code, so its scale is exactly the step
    codes[:, 15] = -top
    codes[:, 16] = top
    step = torch.tensor([0.5] * 15 + [4.0] + [2.0**-10] * 6)
    rows = codes.float() * step
    c, s = quantize(rows, LAYOUT, dtype)
    assert np.array_equal(dequantize(c, s, LAYOUT, dtype), rows.numpy())


def test_int4_packing_is_invertible_for_odd_widths():
    codes = np.random.default_rng(0).integers(-8, 8, size=(4, 7)).astype(np.int8)
    packed = pack_int4(codes)
    assert packed.shape == (4, 4) and packed.dtype == np.uint8
    assert np.array_equal(unpack_int4(packed, 7), codes)


def test_non_finite_rows_are_refused():
    rows = _rows()
    rows[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize(rows, LAYOUT, "int8")


def _write(directory, dtype: str, shards: int = 3, per: int = 4):
    writer = ShardWriter(directory, LAYOUT, dtype, per_token=False)
    writer.set_id_type("int")
    rows = _rows(shards * per)
    for s in range(shards):
        writer.submit(rows[s * per : (s + 1) * per], list(range(s * per, (s + 1) * per)))
    writer.close()
    return rows


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_every_read_path_hands_out_the_same_dequantized_rows(tmp_path, dtype):
    rows = _write(tmp_path, dtype)
    want = torch.from_numpy(dequantize(*quantize(rows, LAYOUT, dtype), LAYOUT, dtype))
    store = Store(tmp_path)
    assert store.dtype == torch.float32 and store.dtype_name == dtype and store.quantized
    code_bytes = (LAYOUT.dim + 1) // 2 if dtype == "int4" else LAYOUT.dim
    assert store.nbytes() == 12 * (code_bytes + 4 * 3)
    assert torch.equal(store.read_all(), want)
    for chunk in (1, 5, 100):
        for prefetch in (0, 2):
            for aligned in (False, True):
                got = list(store.iter_chunks(chunk_rows=chunk, prefetch=prefetch, align_to_shards=aligned))
                assert torch.equal(torch.cat([c.rows for c in got]), want)
                assert [i for c in got for i in c.ids] == list(range(12))
    parts = list(store.iter_chunks(chunk_rows=3, modules=["c", "a"], start=2, stop=10))
    assert torch.equal(torch.cat([c.rows for c in parts]), torch.cat([want[2:10, 16:], want[2:10, :15]], 1))
    assert torch.equal(store.read_all(modules=["b"]), want[:, 15:16])
    assert torch.equal(store.get([7, 0, 11]), want[[7, 0, 11]])
    assert torch.equal(store.get([7, 0], modules=["c"]), want[[7, 0]][:, 16:])


def test_dropping_rows_keeps_each_rows_scales(tmp_path):
    rows = _write(tmp_path, "int4")
    want = torch.from_numpy(dequantize(*quantize(rows, LAYOUT, "int4"), LAYOUT, "int4"))
    assert drop_rows(tmp_path, 0, {1, 6}, per_token=False) == 2
    store = Store(tmp_path)
    keep = [i for i in range(12) if i not in (1, 6)]
    assert store.ids == keep and torch.equal(store.read_all(), want[keep])
    with h5py.File(tmp_path / store.manifest["shards"][0]["file"]) as fh:
        assert fh["rows"].dtype == np.uint8 and fh["scales"].shape == (3, 3)


def _log(root, dtype: str) -> logix.Run:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    run = logix.init(dtype, root=root, config={
        "projection": {"type": "random", "rank_in": 3, "rank_out": 2}, "statistics": {"kfac": True, "ekfac": True},
        "store": {"dtype": dtype, "shard_rows": 8}})
    run.watch(model)
    for _ in run.plan():
        for lo in range(0, 24, 6):
            idx = list(range(lo, lo + 6))
            with run(data_id=idx):
                nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
            model.zero_grad(set_to_none=True)
    run.finalize()
    with run.log_queries(data_id=list(range(24, 30))):
        nn.functional.cross_entropy(model(x[24:]), y[24:], reduction="sum").backward()
    run.finalize()
    return run


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_quantized_run_stores_the_quantized_float32_rows_and_scores_them_exactly(tmp_path, dtype):
    exact, quantized = _log(tmp_path, "float32"), _log(tmp_path, dtype)
    ref = exact.store().read_all()
    store = quantized.store()
    layout = store.layout
    assert torch.equal(store.read_all(), torch.from_numpy(dequantize(*quantize(ref, layout, dtype), layout, dtype)))
    queries = quantized.store("queries")
    assert queries.dtype_name == "float32" and torch.equal(queries.read_all(), exact.store("queries").read_all())
    # A, S (and their eigenbases) are accumulated from the unquantized gradients: identical to the
    # float32 run's; the EK-FAC corrections are the second moments of the rows in that eigenbasis,
    # read back from the stored rows after the log pass (float32, int8: their dequantized values)
    # or, int4, accumulated from the unquantized gradients in the log pass after a KFAC pass
    a, b = exact.statistics.flat(), quantized.statistics.flat()
    assert a.keys() == b.keys() and any("ekfac" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("ekfac"))
    assert exact.passes == ["log"] and quantized.passes == (["log"] if dtype == "int8" else ["kfac", "log"])
    for run, rows in ((exact, ref), (quantized, store.read_all() if dtype == "int8" else ref)):
        for blk in layout.blocks:
            g = rows[:, blk.columns].double().reshape(-1, *blk.shape)
            q_s, q_a = run.statistics.raw_sum(blk.name, "S_evecs"), run.statistics.raw_sum(blk.name, "A_evecs")
            assert rel_err(run.statistics.mean(blk.name, "ekfac"), ((q_s.T @ g @ q_a) ** 2).mean(0)) < 1e-10
    # scoring streams the dequantized rows: brute force on them (identity), and the same
    # preconditioner over a float32 store holding exactly those rows (ekfac), are the oracles
    deq = store.read_all()
    plain = ShardWriter(tmp_path / "deq", layout, "float32", per_token=False)
    plain.set_id_type("int")
    plain.submit(deq, store.ids)
    plain.close()
    for pre in ("identity", "ekfac"):
        cp = load_checkpoint(quantized.dir, pre)
        got = _matrix(compute_influence(cp, top_k=24, dtype=torch.float64, progress=False))
        if pre == "identity":
            want = queries.read_all().double() @ deq.double().T
        else:
            twin = Checkpoint(Store(tmp_path / "deq"), cp.queries, cp.preconditioner)
            want = _matrix(compute_influence(twin, top_k=24, dtype=torch.float64, progress=False))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert got.abs().max() > 0


def _matrix(result) -> torch.Tensor:
    got = torch.zeros(len(result.query_ids), len(result.train_ids), dtype=torch.float64)
    got.scatter_(1, result.top_index, result.top_scores.double())
    return got


def test_sharded_scoring_of_an_int4_store_equals_the_single_call(tmp_path):
    run = _log(tmp_path, "int4")
    cp = load_checkpoint(run.dir, "ekfac")
    one = compute_influence(cp, top_k=5, progress=False)
    parts = sharded_influence(cp, tmp_path / "work", top_k=5, part_rows=7, progress=False)
    assert parts.top_ids == one.top_ids
    torch.testing.assert_close(parts.top_scores, one.top_scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.self_influence, one.self_influence, rtol=1e-5, atol=1e-7)


def test_job_with_the_lm_influence_preset_logs_int4_rows_and_scores_them(tmp_path):
    tokenizer = load_tokenizer(str(DATA / "tokenizer.json"))
    torch.manual_seed(0)
    folder = tmp_path / "pretrained"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer))
                    ).save_pretrained(folder)
    preset = logix.Config.from_yaml(ROOT / "configs" / "lm_influence.yaml").to_dict()
    config = {**preset, "root": str(tmp_path / "runs"),
              "model": {"name": str(folder), "tokenizer": str(DATA / "tokenizer.json")},
              "data": {"train": str(DATA / "instructions.jsonl"), "queries": str(DATA / "queries.jsonl"),
                       "limit_train": 12, "limit_queries": 3, "max_length": 48},
              "schedule": {"batch_size": 4}}
    result = AttributionJob(config, project="q", progress=False).run()
    assert len(result.checkpoints) == 1  # scored at the trained model
    run_dir = tmp_path / "runs" / "q" / result.checkpoints[0]
    store = logix.load_run_store(run_dir)
    assert store.dtype_name == "int4" and store.n_rows == 12
    assert logix.load_run_store(run_dir, "queries").dtype_name == "float32"
    # identity scoring of whitened rows: the brute-force dot products of the dequantized rows
    want = logix.load_run_store(run_dir, "queries").read_all().double() @ store.read_all().double().T
    top = want.topk(len(result.influence.top_ids[0]), dim=1)
    assert top.values.shape[1] == 10  # analysis.top_k
    assert result.influence.top_ids == [[store.ids[i] for i in row] for row in top.indices.tolist()]
    torch.testing.assert_close(result.influence.top_scores.double(), top.values, rtol=1e-4, atol=1e-6)


def test_per_token_rows_quantize_like_per_example_rows(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    x = torch.randn(3, 7, 4)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    stores = {}
    for dtype in ("float32", "int4"):
        run = logix.init(dtype, root=tmp_path, config={
            "capture": {"per_token": True}, "projection": {"type": "random", "rank_in": 3, "rank_out": 3},
            "statistics": {"ekfac": False}, "store": {"dtype": dtype}})  # one pass: logs without run.plan()
        run.watch(model)
        with run(data_id=["a", "b", "c"], mask=mask):
            model(x).pow(2).sum().backward()
        model.zero_grad(set_to_none=True)
        stores[dtype] = run.finalize()
    exact, quantized = stores["float32"], stores["int4"]
    assert quantized.per_token and quantized.n_rows == int(mask.sum()) == exact.n_rows
    assert quantized.ids == exact.ids and np.array_equal(quantized.positions, exact.positions)
    layout = quantized.layout
    want = dequantize(*quantize(exact.read_all(), layout, "int4"), layout, "int4")
    assert np.array_equal(quantized.read_all().numpy(), want)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["dot", "cosine", "relative", "unit"])
def test_scoring_from_the_codes_equals_scoring_the_decoded_rows(tmp_path, dtype, mode):
    """The fused scorer (codes, block scales after each block's GEMM, in cache-sized row blocks)
    against brute force in float64 on the dequantized rows: every score, and self-influence."""
    gen = torch.Generator().manual_seed(3)
    layout = Layout.build([("a", "linear", (5, 7)), ("b", "linear", (3, 3)), ("c", "linear", (1, 9))])
    writer = ShardWriter(tmp_path / "s", layout, dtype, per_token=False)
    writer.set_id_type("int")
    rows = torch.randn(150, layout.dim, generator=gen) * torch.tensor([1.0] * 35 + [30.0] * 9 + [0.01] * 9)
    for lo in range(0, 150, 37):  # shards of 37 rows
        writer.submit(rows[lo:lo + 37], list(range(lo, min(lo + 37, 150))))
    writer.close()
    store = Store(tmp_path / "s")
    deq = store.read_all().double()
    coded = list(store.iter_chunks(chunk_rows=40, coded=True))  # chunks spanning shards, codes joined
    assert all(c.coded is not None for c in coded)
    assert torch.equal(torch.cat([c.rows for c in coded]), store.read_all())
    queries = torch.randn(6, layout.dim, generator=gen)
    cp = Checkpoint(store, queries, Preconditioner("identity", None, layout))
    got = compute_influence(cp, mode=mode, top_k=150, chunk_rows=40, progress=False)
    q = queries.double()
    if mode == "unit":
        q, d = q / q.norm(dim=1, keepdim=True), deq / deq.norm(dim=1, keepdim=True)
    else:
        d = deq
    want = q @ d.T
    self_inf = (d * d).sum(1)
    if mode == "cosine":
        want = want / q.norm(dim=1, keepdim=True) / self_inf.sqrt()
    elif mode == "relative":
        want = want / self_inf.sqrt()
    torch.testing.assert_close(_matrix(got), want, rtol=2e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got.self_influence, self_inf, rtol=1e-6, atol=0)
