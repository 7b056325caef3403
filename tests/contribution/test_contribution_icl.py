"""In-context contribution (logix.contribution.icl) and response likelihoods (logix.contribution.lm).

Every number is checked against a brute-force oracle: one full forward pass per pair, log-softmax
in float64, the response tokens located from separately tokenized segments.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from logix.contribution import icl as icl_module
from logix.contribution import icl_plan
from logix.contribution.assessment import assessment_set
from logix.contribution.icl import icl_contribution
from logix.contribution.icl_logs import load_icl_scores
from logix.contribution.icl_plan import CHAR_ALPHABET
from logix.contribution.icl_result import IclResult, sigmoid_map
from logix.contribution.lm import bos_ids, encode, response_nll
from logix.data import PromptTemplate, load_jsonl, load_tokenizer
from logix.errors import DataError, LogixError, RunDirectoryError, StoreError

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "examples" / "data" / "tokenizer.json")
POOL = load_jsonl(ROOT / "examples" / "data" / "instructions.jsonl")
SEP = "\n\n\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than several on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2_tok():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def llama_tok():
    """The shipped vocabulary plus a distinct ``<s>`` that the tokenizer prepends itself, LLaMA style."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    backend = Tokenizer.from_file(TOKENIZER)
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def _gpt2(vocab: int, positions: int = 256) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=positions,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _llama(vocab: int, bos: int) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                         bos_token_id=bos, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, gpt2_tok, llama_tok):
    if request.param == "gpt2":
        return _gpt2(len(gpt2_tok)), gpt2_tok
    return _llama(len(llama_tok), llama_tok.bos_token_id), llama_tok


def _pick(category: str, n: int, start: int = 0) -> list[dict]:
    return [r for r in POOL if r["category"] == category][start:start + n]


CANDIDATES = _pick("reverse", 1) + _pick("sort", 1) + _pick("capitals", 1)
PROBES = _pick("reverse", 2, 5) + _pick("uppercase", 2) + _pick("arithmetic", 1)


# ---- oracle ---------------------------------------------------------------------------------


@torch.no_grad()
def _oracle_nll(model, ids: list[int], start: int) -> tuple[float, int]:
    """Summed NLL of ``ids[start:]`` from one full forward pass, in float64."""
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = -sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    return total, len(ids) - start


def _oracle_ppl(model, tok, demo_ids: list[int] | None, probe: dict, bos: list[int]) -> float:
    t = PromptTemplate()
    x = encode(tok, [t.prompt(probe)])[0]
    y = encode(tok, [t.response(probe)])[0]
    head = bos + ([] if demo_ids is None else demo_ids + encode(tok, [SEP])[0]) + x
    nll, n = _oracle_nll(model, head + y, len(head))
    return math.exp(nll / n)


def _demo_ids(tok, record: dict) -> list[int]:
    t = PromptTemplate()
    return encode(tok, [t.prompt(record) + t.response(record)])[0]


def _chars_ids(tok, record: dict, seed: int) -> list[int]:
    t = PromptTemplate()
    text = t.prompt(record) + t.response(record)
    picks = icl_plan.control_rng(seed, str(record["id"])).integers(0, len(CHAR_ALPHABET), size=len(text))
    rnd = "".join(CHAR_ALPHABET[k] for k in picks)
    assert len(rnd) == len(text)
    return encode(tok, [rnd])[0]


# ---- lm.response_nll ---------------------------------------------------------------------------


def test_bos_auto(gpt2_tok, llama_tok):
    assert bos_ids(gpt2_tok) == []
    assert bos_ids(llama_tok) == [llama_tok.bos_token_id]
    assert bos_ids(gpt2_tok, True) == [gpt2_tok.bos_token_id]
    assert bos_ids(llama_tok, False) == []
    with pytest.raises(DataError):
        bos_ids(gpt2_tok, "yes")


def test_response_nll_matches_oracle_and_masks_exactly_the_response(lm):
    model, tok = lm
    bos = bos_ids(tok)
    prefixes = ["### Instruction:\nSort the words.\n\n### Response:", "", "a much longer prefix " * 5, "x"]
    responses = [" fish, road", " abc def ghi", " y", " one two three four"]
    nll, n = response_nll(model, tok, prefixes, responses, batch_size=3)
    assert nll.dtype == np.float64 and n.dtype == np.int64
    for p, r, got, count in zip(prefixes, responses, nll, n):
        pi, ri = encode(tok, [p])[0], encode(tok, [r])[0]
        head = bos + pi
        start = max(len(head), 1)
        want, want_n = _oracle_nll(model, head + ri, start)
        assert count == want_n == (len(ri) if head else len(ri) - 1)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # masking: changing the prefix's first tokens changes the score only through the context, and a
    # response's count never includes prefix tokens
    one, _ = response_nll(model, tok, [prefixes[0]], [responses[0]], batch_size=1)
    assert one[0] == pytest.approx(nll[0], rel=1e-5)


def test_response_nll_truncates_the_prefix_from_the_left(gpt2_tok):
    model = _gpt2(len(gpt2_tok), positions=16)
    prefix = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    response = " alpha beta"
    pi, ri = encode(gpt2_tok, [prefix])[0], encode(gpt2_tok, [response])[0]
    assert len(pi) + len(ri) > 16
    nll, n = response_nll(model, gpt2_tok, [prefix], [response])  # max_length from n_positions
    kept = pi[len(pi) - (16 - len(ri)):]
    want, want_n = _oracle_nll(model, kept + ri, len(kept))
    assert n[0] == want_n and nll[0] == pytest.approx(want, rel=1e-5)
    with pytest.raises(DataError, match="response alone"):
        response_nll(model, gpt2_tok, ["x"], [" a" * 20])


def test_response_nll_bad_input(gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    with pytest.raises(DataError, match="no tokens"):
        response_nll(model, gpt2_tok, ["prompt"], [""])
    with pytest.raises(DataError, match="prefixes"):
        response_nll(model, gpt2_tok, ["a", "b"], [" c"])
    with pytest.raises(DataError, match="batch_size"):
        response_nll(model, gpt2_tok, ["a"], [" c"], batch_size=0)
    with pytest.raises(DataError, match="not a str"):
        response_nll(model, gpt2_tok, [None], [" c"])


# ---- icl: every score equals the oracle ----------------------------------------------------------


@pytest.mark.parametrize("control", ["chars", "tokens"])
def test_cached_batched_reference_and_oracle_agree(lm, control):
    model, tok = lm
    results = {m: icl_contribution(model, tok, CANDIDATES, PROBES, control=control, seed=3, batch_size=2,
                                   method=m, progress=False)
               for m in ("cached", "batched", "reference")}
    ref = results["reference"]
    for m in ("cached", "batched"):
        for name in ("nll0", "nll_t", "nll_r"):
            np.testing.assert_allclose(getattr(results[m], name), getattr(ref, name), rtol=1e-5, atol=1e-5)
        for name in ("n0", "n_t", "n_r"):
            np.testing.assert_array_equal(getattr(results[m], name), getattr(ref, name))
    res = results["cached"]
    bos = bos_ids(tok)
    vocab = icl_plan.vocabulary(model, tok)
    for i, probe in enumerate(PROBES):
        assert res.p0[i] == pytest.approx(_oracle_ppl(model, tok, None, probe, bos), rel=1e-5)
    for j, cand in enumerate(CANDIDATES):
        demo = _demo_ids(tok, cand)
        if control == "chars":
            ctrl = _chars_ids(tok, cand, 3)
        else:
            ctrl = vocab[icl_plan.control_rng(3, cand["id"]).integers(0, vocab.size, size=len(demo))].tolist()
            assert len(ctrl) == len(demo) and not set(ctrl) & set(tok.all_special_ids)
        for i, probe in enumerate(PROBES):
            assert res.pt[j, i] == pytest.approx(_oracle_ppl(model, tok, demo, probe, bos), rel=1e-5)
            assert res.pr[j, i] == pytest.approx(_oracle_ppl(model, tok, ctrl, probe, bos), rel=1e-5)
    # the scores are the stated functions of the perplexities
    c = (res.pr - res.pt) / (res.p0[None] + 1e-6)
    np.testing.assert_allclose(res.c, c)
    np.testing.assert_allclose(res.score, [np.mean(row) for row in c])
    np.testing.assert_allclose(res.share_positive, [np.mean([v > 0 for v in row]) for row in c])
    np.testing.assert_allclose(res.variance, [np.var(row) for row in c])
    assert [r["id"] for r in res.records()] == [c["id"] for c in CANDIDATES]


def test_control_none_uses_p0(gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    res = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, control="none", progress=False)
    np.testing.assert_array_equal(res.pr, np.broadcast_to(res.p0, res.pr.shape))
    np.testing.assert_allclose(res.c, (res.p0[None] - res.pt) / (res.p0[None] + 1e-6))


def test_control_is_seeded_per_candidate(gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    a = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, seed=1, progress=False)
    b = icl_contribution(model, gpt2_tok, CANDIDATES[::-1], PROBES, seed=1, progress=False)
    np.testing.assert_allclose(a.nll_r, b.nll_r[::-1], rtol=1e-6)  # same draw whatever the order
    c = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, seed=2, progress=False)
    assert not np.allclose(a.nll_r, c.nll_r)
    np.testing.assert_allclose(a.nll_t, c.nll_t, rtol=1e-6)


def test_demonstration_truncated_from_the_left(gpt2_tok):
    model = _gpt2(len(gpt2_tok), positions=48)
    t = PromptTemplate()
    probes = _pick("antonyms", 2)
    cands = _pick("sort", 1)
    res = icl_contribution(model, gpt2_tok, cands, probes, control="none", batch_size=2, progress=False)
    longest = max(len(encode(gpt2_tok, [t.prompt(p)])[0]) + len(encode(gpt2_tok, [t.response(p)])[0]) for p in probes)
    budget = 48 - len(encode(gpt2_tok, [SEP])[0]) - longest
    demo = _demo_ids(gpt2_tok, cands[0])
    assert len(demo) > budget > 0
    for i, p in enumerate(probes):
        assert res.pt[0, i] == pytest.approx(_oracle_ppl(model, gpt2_tok, demo[-budget:], p, []), rel=1e-5)
    long_probe = {"id": "long", "instruction": "word " * 60, "input": "", "output": "x"}
    with pytest.raises(DataError, match="no room for a demonstration"):
        icl_contribution(model, gpt2_tok, cands, [long_probe], progress=False)


# ---- logs, recompute, resume ----------------------------------------------------------------------


def test_logs_recompute_equals_live(tmp_path, gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    live = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, run_dir=tmp_path, commit_every=4, progress=False)
    again = load_icl_scores(tmp_path)
    assert again.ids == live.ids and again.probe_ids == live.probe_ids
    for name in ("nll0", "n0", "nll_t", "n_t", "nll_r", "n_r", "score", "sigmoid_score", "c"):
        np.testing.assert_array_equal(getattr(again, name), getattr(live, name))
    part = live.subset([CANDIDATES[2]["id"], CANDIDATES[0]["id"]])
    assert part.ids == [CANDIDATES[2]["id"], CANDIDATES[0]["id"]] and part.probe_ids == live.probe_ids
    np.testing.assert_array_equal(part.score, live.score[[2, 0]])
    np.testing.assert_array_equal(part.c, live.c[[2, 0]])
    meta = json.loads((tmp_path / "icl" / "meta.json").read_text())
    assert meta["control"] == "chars" and meta["probe_ids"] == [p["id"] for p in PROBES]
    from logix.store import load_store

    pairs = load_store(tmp_path / "icl" / "pairs")
    assert len(pairs) == len(CANDIDATES) * len(PROBES) and pairs.n_shards == 3  # 5 pairs per candidate >= commit_every: a shard each
    assert f"{CANDIDATES[1]['id']}\x1f{PROBES[2]['id']}" in pairs.ids


def test_resume_skips_committed_pairs(tmp_path, gpt2_tok, monkeypatch):
    model = _gpt2(len(gpt2_tok))
    full = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, progress=False)
    real = icl_module._score_prefix
    calls: list[int] = []

    def failing(model_, plan, segment, probes, method, batch_size, pad):
        calls.append(len(probes))
        if len(calls) == 3:  # the first prefix of the second candidate: candidate 0 is committed
            raise KeyboardInterrupt
        return real(model_, plan, segment, probes, method, batch_size, pad)

    monkeypatch.setattr(icl_module, "_score_prefix", failing)
    with pytest.raises(KeyboardInterrupt):
        icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, run_dir=tmp_path, commit_every=1, progress=False)
    with pytest.raises(StoreError, match="resume"):
        load_icl_scores(tmp_path)
    partial = load_icl_scores(tmp_path, partial=True)
    assert partial.ids == [CANDIDATES[0]["id"]]
    np.testing.assert_allclose(partial.score, full.score[:1], rtol=1e-6)

    calls.clear()
    monkeypatch.setattr(icl_module, "_score_prefix", lambda *a: calls.append(len(a[3])) or real(*a))
    resumed = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, run_dir=tmp_path, progress=False)
    assert calls == [len(PROBES)] * 4  # candidates 1 and 2, demonstration + control; candidate 0 skipped
    np.testing.assert_allclose(resumed.c, full.c, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(load_icl_scores(tmp_path).c, resumed.c)


def test_run_dir_with_other_settings_is_refused(tmp_path, gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, run_dir=tmp_path, progress=False)
    with pytest.raises(RunDirectoryError, match="control"):
        icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, run_dir=tmp_path, control="tokens", progress=False)
    with pytest.raises(RunDirectoryError, match="probe_ids"):
        icl_contribution(model, gpt2_tok, CANDIDATES, PROBES[:2], run_dir=tmp_path, progress=False)
    res = icl_contribution(model, gpt2_tok, CANDIDATES, PROBES[:2], run_dir=tmp_path, overwrite=True, progress=False)
    assert load_icl_scores(tmp_path).probe_ids == res.probe_ids
    with pytest.raises(StoreError, match="no in-context"):
        load_icl_scores(tmp_path / "nothing")


# ---- assessment set ---------------------------------------------------------------------------------


def test_assessment_set_proportional_counts():
    pool = [{"id": i, "category": c} for i, c in enumerate("a" * 10 + "b" * 5 + "c" * 3)]
    sample = assessment_set(pool, 7, seed=0)
    # exact shares 3.89 / 1.94 / 1.17: floors 3 / 1 / 1, the two leftovers go to b then a
    assert Counter(r["category"] for r in sample) == {"a": 4, "b": 2, "c": 1}
    assert [r["id"] for r in sample] == sorted(r["id"] for r in sample)  # pool order
    assert len({r["id"] for r in sample}) == 7
    assert assessment_set(pool, 7, seed=0) == sample
    assert any(assessment_set(pool, 7, seed=s) != sample for s in range(1, 5))
    shipped = assessment_set(POOL, 60, seed=1)
    assert Counter(r["category"] for r in shipped) == {c: 10 for c in {r["category"] for r in POOL}}
    assert len(assessment_set(pool, 18)) == 18


def test_assessment_set_equal_allocation_caps_small_categories():
    pool = [{"id": i, "kind": c} for i, c in enumerate("a" * 10 + "b" * 5 + "c" * 1)]
    sample = assessment_set(pool, 9, category_key="kind", allocation="equal", seed=4)
    assert Counter(r["kind"] for r in sample) == {"a": 4, "b": 4, "c": 1}


def test_assessment_set_bad_input():
    pool = [{"id": 0, "category": "a"}, {"id": 1}]
    with pytest.raises(DataError, match="category"):
        assessment_set(pool, 1)
    with pytest.raises(DataError, match="size"):
        assessment_set(pool[:1], 2)
    with pytest.raises(DataError, match="allocation"):
        assessment_set(pool[:1], 1, allocation="odd")


# ---- bad input, helpers ---------------------------------------------------------------------------------


def test_icl_bad_input(gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    empty = {"id": "e", "instruction": "Say nothing.", "input": "", "output": ""}
    with pytest.raises(DataError, match="empty response"):
        icl_contribution(model, gpt2_tok, CANDIDATES, PROBES + [empty], progress=False)
    with pytest.raises(DataError, match="empty response"):
        icl_contribution(model, gpt2_tok, [empty], PROBES, progress=False)
    with pytest.raises(DataError, match="duplicate"):
        icl_contribution(model, gpt2_tok, CANDIDATES + CANDIDATES[:1], PROBES, progress=False)
    with pytest.raises(DataError, match="control"):
        icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, control="words", progress=False)
    with pytest.raises(DataError, match="assessment set"):
        icl_contribution(model, gpt2_tok, CANDIDATES, [], progress=False)
    with pytest.raises(DataError, match="reserved"):
        icl_contribution(model, gpt2_tok, [{**CANDIDATES[0], "id": "a\x1fb"}], PROBES, progress=False)
    with pytest.raises(DataError, match="has no"):
        icl_contribution(model, gpt2_tok, [{"id": "x", "instruction": "y", "input": ""}], PROBES, progress=False)
    with pytest.raises(LogixError, match="method"):
        icl_contribution(model, gpt2_tok, CANDIDATES, PROBES, method="fast", progress=False)


def test_ids_default_to_content_hashes(gpt2_tok):
    model = _gpt2(len(gpt2_tok))
    cands = [{k: v for k, v in c.items() if k != "id"} for c in CANDIDATES]
    res = icl_contribution(model, gpt2_tok, cands, PROBES, control="none", progress=False)
    assert len(set(res.ids)) == 3 and all(len(i) == 16 for i in res.ids)


def test_sigmoid_map():
    x = np.array([-2.0, -0.5001, -0.5, -0.01, 0.0, 0.01, 0.5, 0.51, 3.0])
    want = [-1.0, -1.0, 2 / (1 + math.exp(25)) - 1, 2 / (1 + math.exp(0.5)) - 1, 0.0,
            2 / (1 + math.exp(-0.5)) - 1, 2 / (1 + math.exp(-25)) - 1, 1.0, 1.0]
    np.testing.assert_allclose(sigmoid_map(x), want, rtol=1e-12, atol=1e-15)
    res = IclResult(ids=["a"], probe_ids=["p", "q"], nll0=np.log([2.0, 4.0]), n0=np.array([1, 1]),
                    nll_t=np.log([[1.0, 4.0]]), n_t=np.array([[1, 1]]), nll_r=np.log([[3.0, 2.0]]),
                    n_r=np.array([[1, 1]]), control="chars")
    np.testing.assert_allclose(res.c, [[2 / (2 + 1e-6), -2 / (4 + 1e-6)]])
    # c = [0.9999995, -0.49999988]: the first saturates at 1, the second is just inside the sigmoid band
    np.testing.assert_allclose(res.sigmoid_score, [(1.0 + 2 / (1 + math.exp(50 * 2 / (4 + 1e-6))) - 1) / 2], rtol=0, atol=1e-15)
    assert res.share_positive[0] == 0.5


# ---- planted signal ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_planted_signal_same_task_demonstrations_help(gpt2_tok):
    """Train a tiny LM on 3-shot episodes of the shipped rule tasks (a demonstration tells the task),
    then score, per task, clean demonstrations of the task, shuffled-response ones (the task's
    instruction with another task's output) and a random-text candidate against the task's probes:
    every clean one beats the random text, and clean ones beat shuffled ones in most tasks."""
    tok = gpt2_tok
    t = PromptTemplate()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=len(tok), n_positions=192,
                                       bos_token_id=0, eos_token_id=0))
    by_task: dict[str, list[dict]] = {}
    for r in POOL:
        by_task.setdefault(r["category"], []).append(r)
    tasks = sorted(by_task)
    seen = {task: [encode(tok, [t.prompt(r) + t.response(r)])[0] for r in by_task[task][:300]] for task in tasks}
    rng = np.random.default_rng(0)
    sep = encode(tok, [SEP])[0]
    eos = tok.eos_token_id

    def episode() -> list[int]:
        task = tasks[rng.integers(len(tasks))]
        ids: list[int] = []
        for k in rng.choice(300, size=3, replace=False):  # records 300+ stay unseen
            ids += seen[task][k] + sep
        return ids[:-len(sep)] + [eos]

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        batch = [episode() for _ in range(8)]
        width = max(map(len, batch))
        ids = torch.tensor([b + [eos] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    wins = 0
    for task in tasks:
        others = [x for x in tasks if x != task]
        probes = by_task[task][400:406]
        clean = [dict(by_task[task][450 + m], id=f"clean-{m}") for m in range(4)]
        shuffled = [dict(by_task[task][460 + m], id=f"shuf-{m}", output=by_task[others[m % 5]][460 + m]["output"])
                    for m in range(4)]
        noise = [{"id": "noise", "instruction": "qz xv " * 8, "input": "", "output": "lk jh wq"}]
        res = icl_contribution(model, tok, clean + shuffled + noise, probes, seed=0, batch_size=8, progress=False)
        score = res.score
        assert score[:4].min() > score[8], (task, score)
        wins += score[:4].mean() > score[4:8].mean()
    assert wins >= 4, wins
