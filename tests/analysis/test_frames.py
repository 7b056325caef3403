"""InfluenceResult as pandas objects: the tidy frame, the dense matrix and self-influence hold
exactly the result's own arrays, ids and order."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import logix
from logix.analysis import compute_influence, load_checkpoint
from logix.errors import LogixError

N_TRAIN, N_QUERY, K = 30, 4, 5


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frames")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x, y = torch.randn(N_TRAIN + N_QUERY, 5, dtype=torch.float64), torch.randint(0, 3, (N_TRAIN + N_QUERY,))
    run = logix.init("frames", config={"projection": {"type": "none"}, "capture": {"compute_dtype": "float64"}},
                     root=tmp)
    run.watch(model)

    def loss(idx):
        return nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum")

    for _ in run.plan():
        for lo in range(0, N_TRAIN, 10):
            with run(data_id=[f"t{i}" for i in range(lo, lo + 10)]):
                loss(list(range(lo, lo + 10))).backward()
    run.finalize()
    with run.log_queries(data_id=[f"q{i}" for i in range(N_QUERY)]):
        loss(list(range(N_TRAIN, N_TRAIN + N_QUERY))).backward()
    run.finalize()
    result = compute_influence(load_checkpoint(run.dir, "identity"), query_ids=run.store("queries").ids, top_k=K,
                               scores_path=tmp / "scores.h5", progress=False, dtype=torch.float64)
    return result


def test_tidy_frame_holds_the_top_lists_in_order(scored):
    frame = scored.to_pandas()
    assert list(frame.columns) == ["query_index", "query_id", "kind", "rank", "train_id", "train_index", "score"]
    assert len(frame) == N_QUERY * 2 * K
    assert frame["score"].dtype == np.float64 and frame["rank"].dtype == np.int64
    assert list(frame["kind"].cat.categories) == ["proponent", "opponent"]
    for q, qid in enumerate(scored.query_ids):
        rows = frame[frame["query_id"] == qid]
        assert (rows["query_index"] == q).all()
        pro, opp = rows[rows["kind"] == "proponent"], rows[rows["kind"] == "opponent"]
        assert list(pro["train_id"]) == scored.top_ids[q] and list(opp["train_id"]) == scored.bottom_ids[q]
        np.testing.assert_array_equal(pro["score"].to_numpy(), scored.top_scores[q].numpy())
        np.testing.assert_array_equal(opp["score"].to_numpy(), scored.bottom_scores[q].numpy())
        assert list(pro["rank"]) == list(range(1, K + 1)) == list(opp["rank"])
        assert list(pro["train_index"]) == scored.top_index[q].tolist()
        assert [scored.train_ids[i] for i in opp["train_index"]] == scored.bottom_ids[q]
    # query by query, proponents first, each by rank; scores descending / ascending
    assert list(frame["query_id"]) == [qid for qid in scored.query_ids for _ in range(2 * K)]
    assert frame.groupby(["query_id", "kind"], observed=True)["score"].apply(
        lambda s: s.is_monotonic_decreasing or s.is_monotonic_increasing).all()


def test_texts_by_mapping_or_aligned_sequence(scored):
    train_texts = {tid: f"text of {tid}" for tid in scored.train_ids}
    query_texts = [f"question {i}" for i in range(N_QUERY)]
    frame = scored.to_pandas(train_texts=train_texts, query_texts=query_texts)
    assert list(frame.columns[:4]) == ["query_index", "query_id", "query_text", "kind"]
    assert (frame["train_text"] == "text of " + frame["train_id"]).all()
    assert (frame["query_text"] == "question " + frame["query_index"].astype(str)).all()
    partial = scored.to_pandas(train_texts={scored.top_ids[0][0]: "only one"})
    assert partial["train_text"].notna().sum() == (partial["train_id"] == scored.top_ids[0][0]).sum()
    with pytest.raises(LogixError, match="aligned"):
        scored.to_pandas(query_texts=["too few"])


def test_dense_matrix_frame_agrees_with_the_top_lists(scored):
    matrix = scored.scores_frame()
    assert list(matrix.index) == scored.query_ids and list(matrix.columns) == scored.train_ids
    assert matrix.index.name == "query_id" and matrix.columns.name == "train_id"
    for q, qid in enumerate(scored.query_ids):
        row = matrix.loc[qid]
        np.testing.assert_allclose(row[scored.top_ids[q]].to_numpy(), scored.top_scores[q].numpy(), rtol=1e-6)
        assert list(row.sort_values(ascending=False).index[:K]) == scored.top_ids[q]
    # the tidy frame is the long form of the matrix's extremes
    tidy = scored.to_pandas()
    looked_up = [matrix.at[q, t] for q, t in zip(tidy["query_id"], tidy["train_id"])]
    np.testing.assert_allclose(looked_up, tidy["score"], rtol=1e-6)


def test_self_influence_series(scored):
    series = scored.self_influence_series()
    assert series.name == "self_influence" and list(series.index) == scored.train_ids
    np.testing.assert_array_equal(series.to_numpy(), scored.self_influence.numpy())


def test_missing_matrix_or_self_influence_say_how_to_get_them(scored):
    bare = type(scored)(scored.query_ids, scored.train_ids, scored.top_ids, scored.top_scores, scored.bottom_ids,
                        scored.bottom_scores)
    with pytest.raises(LogixError, match="scores_path"):
        bare.scores_frame()
    with pytest.raises(LogixError, match="self_influence=True"):
        bare.self_influence_series()
    frame = bare.to_pandas()  # no row indices recorded: no train_index column
    assert "train_index" not in frame.columns and len(frame) == N_QUERY * 2 * K


def test_without_pandas_the_error_names_the_extra(scored, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'logix-attribution\[pandas\]'"):
        scored.to_pandas()
    assert pd.DataFrame  # the real module is back after the test
