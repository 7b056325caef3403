"""``logix.score``: new examples scored against a finished run without logging them.

Oracle: the same examples logged as queries the ordinary way (``run.log_queries`` then
:func:`logix.analysis.influence`) give the same top-k ids and scores.
"""

from __future__ import annotations

import pytest
import torch

import logix
from logix.analysis import Index, influence
from logix.errors import RunDirectoryError
from logix.integrations import extract
from tests.helpers import collate, tiny_gpt2

VOCAB = 37


def items(n: int, seed: int, prefix: str) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(5, 12, (1,), generator=gen)),), generator=gen).tolist()
        out.append({"id": f"{prefix}{i}", "input_ids": ids, "labels": ids})
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    model = tiny_gpt2(dtype=torch.float32)
    run = logix.init("p", root=root, config={"projection": {"rank_in": 4, "rank_out": 4}})
    train, queries = items(40, 0, "t"), items(6, 1, "q")
    extract(run, model, train, collate, queries=queries, batch_size=8, progress=False)
    return root / "p", run, model, queries


def test_score_equals_the_logged_query_path(logged):
    run_dir, run, model, queries = logged
    expected = influence(run_dir, top_k=5, progress=False)
    for given in (run, run_dir):  # the open run (its watched model), or the directory and the model
        got = logix.score(given, queries, model=model, collator=collate, batch_size=4, top_k=5)
        assert got.query_ids == expected.query_ids
        assert got.top_ids == expected.top_ids and got.bottom_ids == expected.bottom_ids
        torch.testing.assert_close(got.top_scores, expected.top_scores, rtol=1e-4, atol=1e-7)
        assert got.self_influence is None
    batch = collate(queries[:3])  # one collated batch, ids given
    got = logix.score(run, batch, ids=["a", "b", "c"], top_k=5)
    assert got.query_ids == ["a", "b", "c"] and got.top_ids == expected.top_ids[:3]


def test_score_through_the_index_and_refusals(logged):
    run_dir, run, model, queries = logged
    exact = logix.score(run, queries, collator=collate, top_k=5, mode="unit", use_index=False)
    Index.build(run_dir, kind="flat", mode="unit", progress=False)
    through = logix.score(run, queries, collator=collate, top_k=5, mode="unit")  # used: fresh, same mode
    assert through.top_ids == exact.top_ids
    torch.testing.assert_close(through.top_scores, exact.top_scores, rtol=1e-4, atol=1e-7)
    with pytest.raises(logix.LogixError, match="serves mode 'unit', not 'dot'"):
        logix.score(run, queries, collator=collate, use_index=True)
    with pytest.raises(logix.LogixError, match="collator"):
        logix.score(run, queries)
    other = tiny_gpt2(seed=5, dtype=torch.float32)
    with pytest.raises(RunDirectoryError, match="another state of the model"):
        logix.score(run_dir, queries, model=other, collator=collate)


def test_bad_inputs_to_score_name_the_problem(logged, tmp_path):
    run_dir, run, model, queries = logged
    from logix.analysis import load_checkpoint

    with pytest.raises(logix.LogixError, match=r"Query rows of shape \(2, 3\).*this run's projection"):
        load_checkpoint(run_dir, queries=torch.zeros(2, 3))
    unfinished = logix.init("open", root=tmp_path, model=model)
    with pytest.raises(logix.LogixError, match="not finalized"):
        logix.score(unfinished, queries, collator=collate)
    with pytest.raises(logix.LogixError, match=r"3 ids for 6 examples"):
        logix.score(run, queries, ids=["a", "b", "c"], collator=collate)
