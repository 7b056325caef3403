"""IFD and the response-length baseline against direct, one-record-at-a-time computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logix.contribution.baselines import response_length
from logix.contribution.ifd import ifd_scores
from logix.data import PromptTemplate, load_tokenizer
from logix.errors import DataError

TOKENIZER = "examples/data/tokenizer.json"


def _model(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=128)).eval()


RECORDS = [
    {"instruction": "Sort the words alphabetically.", "input": "pear, apple", "output": "apple, pear"},
    {"instruction": "Reverse the word.", "input": "", "output": "drow"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
]


@torch.no_grad()
def _mean_loss(model, ids: list[int], start: int) -> float:
    """Mean NLL of ids[start:] given everything before it (one sequence, no batching)."""
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = F.log_softmax(logits[:-1], -1)
    targets = torch.tensor(ids[1:])
    nll = -logp[torch.arange(len(ids) - 1), targets]
    return float(nll[start - 1:].mean())


def test_ifd_equals_direct_reference():
    tok = load_tokenizer(TOKENIZER)
    model = _model(len(tok))
    t = PromptTemplate()
    result = ifd_scores(model, tok, RECORDS, batch_size=2, drop_above_one=False, progress=False)
    for i, r in enumerate(RECORDS):
        q = tok(t.prompt(r), add_special_tokens=False)["input_ids"]
        a = tok(t.response(r), add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id]  # the tokenizer has one: both terms start with it
        conditioned = _mean_loss(model, bos + q + a, 1 + len(q))
        unconditioned = _mean_loss(model, bos + a, 1)
        assert result.conditioned[i] == pytest.approx(conditioned, rel=1e-5)
        assert result.unconditioned[i] == pytest.approx(unconditioned, rel=1e-5)
        assert result.ifd[i] == pytest.approx(conditioned / unconditioned, rel=1e-5)
        assert result.n_tokens[i] == len(a)


def test_ifd_scores_one_token_responses():
    tok = load_tokenizer(TOKENIZER)
    record = {"instruction": "Capital of Romania?", "input": "", "output": "a"}
    assert len(tok(" a", add_special_tokens=False)["input_ids"]) == 1
    result = ifd_scores(_model(len(tok)), tok, [record], drop_above_one=False, progress=False)
    assert np.isfinite(result.ifd[0]) and result.n_tokens[0] == 1


def test_ifd_drops_scores_at_or_above_one():
    tok = load_tokenizer(TOKENIZER)
    model = _model(len(tok))
    raw = ifd_scores(model, tok, RECORDS, drop_above_one=False, progress=False).ifd
    dropped = ifd_scores(model, tok, RECORDS, progress=False).ifd
    np.testing.assert_array_equal(np.isnan(dropped), raw >= 1)
    np.testing.assert_array_equal(dropped[raw < 1], raw[raw < 1])


def test_ifd_bad_input():
    tok = load_tokenizer(TOKENIZER)
    model = _model(len(tok))
    with pytest.raises(DataError, match="'output'"):
        ifd_scores(model, tok, [{"instruction": "x", "input": ""}], progress=False)
    with pytest.raises(DataError, match="empty"):
        ifd_scores(model, tok, [{"instruction": "x", "input": "", "output": ""}],
                   template=PromptTemplate(response_prefix=""), progress=False)


def test_response_length_in_tokens_and_characters():
    tok = load_tokenizer(TOKENIZER)
    chars = response_length(RECORDS)
    np.testing.assert_array_equal(chars, [len(r["output"]) for r in RECORDS])
    tokens = response_length(RECORDS, tok)
    assert tokens.tolist() == [len(tok(" " + r["output"], add_special_tokens=False)["input_ids"]) for r in RECORDS]
