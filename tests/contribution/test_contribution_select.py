"""Pool I/O, score tables, selection + export, and the selector heads, against direct references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from logix.analysis.evaluate import spearman
from logix.contribution.baselines import random_scores, response_length
from logix.contribution.embeddings import embed_records
from logix.contribution.pool import load_pool, record_id, record_ids
from logix.contribution.scores import ScoreTable
from logix.contribution.selection import export_selection, format_summary, select
from logix.contribution.selector import Selector, fit_selector
from logix.contribution.selector_heads import ridge_fit
from logix.contribution.selector_report import auc
from logix.errors import DataError

CATS = ["sort", "capitals", "reverse"]


def _records(n: int = 30, ids: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        r = {"category": CATS[i % 3], "instruction": f"task {i}", "input": "" if i % 2 else f"in {i}",
             "output": "x" * (1 + i % 7), "extra": [i]}
        if ids:
            r = {"id": f"ex-{i:03d}", **r}
        out.append(r)
    return out


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- pool ----------------------------------------------------------------------------------------
def test_pool_formats_give_the_same_records(tmp_path):
    records = _records(12)
    a = load_pool(_write_jsonl(tmp_path / "p.jsonl", records))
    (tmp_path / "p.json").write_text(json.dumps(records))
    b = load_pool(tmp_path / "p.json")
    assert a.records == b.records == records and a.ids == [r["id"] for r in records]
    assert (a.format, b.format) == ("jsonl", "json")


def test_pool_from_datasets_directory_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{k: v for k, v in r.items() if k != "extra"} for r in _records(9)]
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for source in (tmp_path / "saved", tmp_path / "p.parquet", ds):
        pool = load_pool(source)
        assert pool.records == records and pool.format == "dataset"


def test_content_ids_are_stable_and_key_order_free():
    a = {"instruction": "x", "output": "y"}
    b = {"output": "y", "instruction": "x"}
    assert record_id(a) == record_id(b) and len(record_id(a)) == 16
    assert record_ids([a, {"instruction": "z", "output": "y"}])[0] == record_id(a)


@pytest.mark.parametrize("records, match", [
    ([{"id": "a", "output": "1"}, {"output": "2"}], "no 'id' field but others do"),
    ([{"id": "a", "output": "1"}, {"id": "a", "output": "2"}], "same id 'a'"),
    ([{"output": "1"}, {"output": "1"}], "same id"),
    ([{"id": 1.5, "output": "1"}], "string or an integer"),
])
def test_pool_id_errors(records, match):
    with pytest.raises(DataError, match=match):
        record_ids(records)


def test_pool_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pool(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown pool format"):
        load_pool(tmp_path / "x.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_pool(tmp_path / "e.jsonl")


# ---- score table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_score_table_round_trip(tmp_path, suffix):
    table = ScoreTable(["a", "b", "c"], {"icl": [0.5, math.nan, -1.25], "ifd": [1, 2, 3]})
    back = ScoreTable.load(table.save(tmp_path / f"s{suffix}"))
    assert back.ids == table.ids and back.names == ["icl", "ifd"]
    np.testing.assert_array_equal(back.column("icl"), table.column("icl"))
    np.testing.assert_array_equal(back.column("ifd"), table.column("ifd"))


def test_score_table_merge_and_errors():
    a = ScoreTable(["a", "b"], {"icl": [1.0, 2.0]})
    b = ScoreTable(["b", "c"], {"less": [5.0, 6.0], "icl": [math.nan, 3.0]})
    m = a.merge(b)
    assert m.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(m.column("icl"), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(m.column("less"), [math.nan, 5.0, 6.0])
    with pytest.raises(DataError, match="no score named 'x'; this table has"):
        m.column("x")
    with pytest.raises(DataError, match="id 'z' is not in the table"):
        m.add_by_id("y", ["z"], [1.0])
    with pytest.raises(DataError, match="2 values for 3 ids"):
        m.add("y", [1.0, 2.0])


# ---- selection -----------------------------------------------------------------------------------
def test_select_equals_argsort_reference_and_skips_nan():
    rng = np.random.default_rng(0)
    ids = [f"e{i}" for i in range(50)]
    values = rng.normal(size=50)
    values[[3, 7]] = np.nan
    values[10] = values[11]  # a tie: pool order decides
    table = ScoreTable(ids, {"s": values})
    sel = select(table, "s", top_k=12)
    ok = [i for i in range(50) if not np.isnan(values[i])]
    reference = sorted(ok, key=lambda i: (-values[i], i))[:12]
    assert sel.ids == [ids[i] for i in reference]
    assert sel.n_scored == 48
    assert len(select(table, "s", top_p=0.25).ids) == 12  # 25 % of the 48 scored
    assert select(table, "s", top_p=1.0).ids == [ids[i] for i in sorted(ok, key=lambda i: (-values[i], i))]


@pytest.mark.parametrize("kw, match", [
    ({}, "exactly one of"), ({"top_p": 0.1, "top_k": 3}, "exactly one of"), ({"top_p": 0.0}, r"\(0, 1\]"),
    ({"top_p": 1.5}, r"\(0, 1\]"), ({"top_k": 0}, "positive integer"),
])
def test_select_argument_errors(kw, match):
    with pytest.raises(DataError, match=match):
        select(ScoreTable(["a", "b"], {"s": [1.0, 2.0]}), "s", **kw)


def test_select_all_nan_and_unknown_score():
    table = ScoreTable(["a", "b"], {"s": [math.nan, math.nan]})
    with pytest.raises(DataError, match="all NaN"):
        select(table, "s", top_k=1)
    with pytest.raises(DataError, match="no score named 'icl'"):
        select(table, "icl", top_k=1)


def test_summary_counts_overlap_and_export(tmp_path):
    records = _records(30)
    pool = load_pool(_write_jsonl(tmp_path / "pool.jsonl", records))
    score = np.array([3.0 if r["category"] == "sort" else float(i) / 100 for i, r in enumerate(records)])
    table = ScoreTable(pool.ids, {"icl": score})
    sel = select(table, "icl", top_k=10, pool=pool)
    assert all(pool.subset([i])[0]["category"] == "sort" for i in sel.ids)
    cats = sel.summary["categories"]
    assert cats["sort"] == {"pool": 10, "selected": 10, "share_pool": 10 / 30, "share_selected": 1.0}
    assert cats["capitals"]["selected"] == 0
    # baselines were added and their agreement equals a direct computation
    length = response_length(records)
    top_len = set(np.array(pool.ids)[np.argsort(-length, kind="stable")[:10]])
    assert sel.summary["agreement"]["length"]["overlap"] == len(top_len & set(sel.ids)) / 10
    rho = spearman(score[:, None], random_scores(30)[:, None])[0]
    assert sel.summary["agreement"]["random"]["spearman"] == pytest.approx(rho)
    assert sel.summary["agreement"]["random"]["baseline"] is True
    assert "vs random" in format_summary(sel.summary)
    # a score computed on a sample is compared on that sample only
    partial = np.full(30, np.nan)
    half = np.arange(0, 30, 2)
    partial[half] = -score[half]  # the reverse order of the chosen score
    table.add("sample_score", partial)
    agreement = select(table, "icl", top_k=10, pool=pool).summary["agreement"]["sample_score"]
    shared = [i for i in sel.ids if pool.ids.index(i) % 2 == 0]
    top = set(np.array(pool.ids)[half][np.argsort(score[half], kind="stable")[:len(shared)]])
    assert agreement["compared"] == len(shared)
    assert agreement["overlap"] == len(top & set(shared)) / len(shared)
    assert agreement["spearman"] == pytest.approx(-1.0)

    paths = export_selection(sel, pool, tmp_path / "out")
    lines = (tmp_path / "out" / "selected.jsonl").read_text().splitlines()
    by_id = {r["id"]: json.dumps(r) for r in records}
    assert lines == [by_id[i] for i in sel.ids]  # the input's own format, key order kept
    summary = json.loads(paths["summary"].read_text())
    assert summary["selected"] == 10 and summary["by"] == "icl"
    assert ScoreTable.load(paths["scores"]).names == ["icl", "length", "random"]


def test_export_json_list_and_nothing_written_on_bad_ids(tmp_path):
    records = _records(6)
    pool = load_pool(records)
    sel = select(ScoreTable(pool.ids, {"s": np.arange(6.0)}), "s", top_k=2, pool=pool)
    export_selection(sel, pool, tmp_path / "a", name="subset.json")
    assert json.loads((tmp_path / "a" / "subset.json").read_text()) == [records[5], records[4]]
    other = ScoreTable(["zz", *pool.ids[:2]], {"s": [1.0, 2.0, 3.0]})
    with pytest.raises(DataError, match="not in the pool"):
        select(other, "s", top_k=1, pool=pool)
    sel.ids = ["zz"]
    with pytest.raises(DataError, match="not in the pool"):
        export_selection(sel, pool, tmp_path / "b")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


# ---- selector heads ------------------------------------------------------------------------------
def test_ridge_leave_one_out_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(25, 6))
    y = x @ rng.normal(size=6) + 0.5 * rng.normal(size=25)
    xc, yc = x - x.mean(0), y - y.mean()
    for alpha in (0.1, 3.0):
        _, chosen, err = ridge_fit(xc, yc, [alpha])
        brute = []
        for i in range(25):
            keep = np.arange(25) != i
            xm, ym = x[keep].mean(0), y[keep].mean()
            w = np.linalg.solve((x[keep] - xm).T @ (x[keep] - xm) + alpha * np.eye(6), (x[keep] - xm).T @ (y[keep] - ym))
            brute.append((y[i] - (ym + (x[i] - xm) @ w)) ** 2)
        assert chosen == alpha and err == pytest.approx(np.mean(brute), rel=1e-8)


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=40), 1)  # ties
    labels = rng.random(40) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[labels] for b in s[~labels]]
    assert auc(s, labels) == pytest.approx(np.mean(pairs))
    assert math.isnan(auc(s, np.zeros(40, bool)))


@pytest.mark.parametrize("head", ["ridge", "logistic", "mlp"])
def test_selector_recovers_a_planted_signal(head):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 16))
    y = x @ rng.normal(size=16) + 0.2 * rng.normal(size=400)
    report = Selector(head, label_top_p=0.2).evaluate(x, y)
    assert report.n_holdout == 80 and report.spearman > 0.85 and report.auc > 0.9
    noise = Selector(head).evaluate(x, rng.normal(size=400))
    assert abs(noise.spearman) < 0.3  # no signal: no skill


def test_selector_errors():
    with pytest.raises(DataError, match="unknown selector head 'svm'"):
        Selector("svm")
    with pytest.raises(DataError, match="at least 4"):
        Selector().fit(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(DataError, match="fit the selector"):
        Selector().predict(np.zeros((1, 2)))


def _tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=64)).eval()


class _CharTokenizer:
    """A tiny character tokenizer with the call signature embed_records uses."""

    pad_token, pad_token_id, padding_side = "~", 0, "right"

    def __call__(self, texts, return_tensors=None, padding=False, truncation=False, max_length=None):
        seqs = [[1 + (ord(c) % 63) for c in t][:max_length] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return {"input_ids": ids, "attention_mask": mask}


def test_embed_records_equals_manual_pooling_and_store_resumes(tmp_path):
    model, tok = _tiny_lm(), _CharTokenizer()
    records = _records(7)
    ids = [r["id"] for r in records]
    emb = embed_records(model, tok, records, ids, batch_size=3, progress=False)
    texts = ["### Instruction:\n" + r["instruction"] + (f"\n\n### Input: {r['input']}" if r["input"] else "")
             + "\n\n### Response: " + r["output"] for r in records]
    for i, t in enumerate(texts):
        enc = tok([t])
        h = model(**enc, output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(emb[i], h.mean(0).detach().numpy(), atol=1e-5)
    last = embed_records(model, tok, records, ids, pooling="last", batch_size=3, progress=False)
    h = model(**tok([texts[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(last[0], h.detach().numpy(), atol=1e-5)

    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    logged = embed_records(model, tok, records[:4], ids[:4], batch_size=2, store_dir=tmp_path / "emb", progress=False)
    assert len(calls) == 2
    resumed = embed_records(model, tok, records, ids, batch_size=2, store_dir=tmp_path / "emb", progress=False)
    assert len(calls) == 4  # only the 3 new records were embedded (2 batches)
    np.testing.assert_allclose(logged, emb[:4], atol=1e-6)
    np.testing.assert_allclose(resumed, emb, atol=1e-6)


def test_fit_selector_scores_the_whole_pool():
    rng = np.random.default_rng(4)
    ids = [f"p{i}" for i in range(300)]
    x = rng.normal(size=(300, 8))
    truth = x @ rng.normal(size=8)
    scored = {ids[i]: truth[i] for i in range(0, 300, 3)}  # a third is scored
    result = fit_selector(Selector("ridge"), ids, x, scored)
    assert result.predictions.shape == (300,) and result.report.n_train + result.report.n_holdout == 100
    assert spearman(result.predictions[:, None], truth[:, None])[0] > 0.99
    with pytest.raises(DataError, match="not in the pool"):
        fit_selector(Selector(), ids, x, {"nope": 1.0})


@pytest.mark.slow
def test_lora_selector_learns_a_planted_category_and_leaves_the_lm_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    from logix.contribution.lora_selector import LoraSelector
    from logix.data import load_jsonl, load_tokenizer

    tok = load_tokenizer("examples/data/tokenizer.json")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok)))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    records = load_jsonl("examples/data/instructions.jsonl")[:200]
    y = np.array([1.0 if r["category"] == "uppercase" else 0.0 for r in records]) + 1e-3 * np.arange(200) / 200
    selector = LoraSelector(lm, tok, label_top_p=0.15, epochs=10, lr=1e-2, max_length=64)
    report = selector.evaluate(records, y)
    assert report.head == "lora" and report.n_holdout == 40 and report.auc > 0.75
    result = fit_selector(selector, [r["id"] for r in records], records, dict(zip([r["id"] for r in records], y)))
    assert result.predictions.shape == (200,)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
