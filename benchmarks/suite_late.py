"""Three more held-out tasks of ``bench_suite.py``, added on 2026-12-08 after every default (and the
``raw`` damping) was fixed, to check them, and the rules that were considered, on data and models
no choice was made on.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (real data; 10 classes, 10% of the
  train labels flipped), an MLP 64-64-32-10 with GELU and LayerNorm, minibatch Adam.
* ``tagger``: one prediction per *token*: the ``text`` encoder without pooling tags each token
  with its sequence's class where it is a keyword of that class and "other" elsewhere (another
  keyword rule and draw; 5% of the tags flipped).
* ``gpt2b``: ``lm``'s tiny GPT-2 recipe on another draw of the four sequence families.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from bench_lds import lm_data, lm_train
from sklearn.datasets import load_digits
from suite_tasks import TEXT, Encoder, Task, conv1d_to_linear, fit, text_data
from torch import nn

DIGITS = {"n_train": 500, "n_query": 60, "flip": 0.1, "steps": 300, "batch": 64, "lr": 3e-3, "weight_decay": 1e-3,
          "seed": 3}


def digits_task() -> Task:
    c = DIGITS
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(c["seed"])
    order = rng.permutation(len(x))[: c["n_train"] + c["n_query"]]
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    n = c["n_train"]
    flip = torch.from_numpy(rng.random(n) < c["flip"])
    yt = y[:n].clone()
    yt[flip] = torch.from_numpy(rng.integers(0, 10, int(flip.sum())))
    xt, xq, yq = x[:n], x[n:], y[n:]

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 32), nn.GELU(),
                             nn.Linear(32, 10))

    def train(mask, seed):
        model, sel = make(seed), torch.from_numpy(np.flatnonzero(mask))
        return fit(model, lambda i: F.cross_entropy(model(xt[sel[i]]), yt[sel[i]], reduction="sum"), len(sel),
                   c["steps"], c["lr"], c["weight_decay"], batch=c["batch"], seed=seed)

    def forward(model, ids, query):
        return model((xq if query else xt)[ids]), (yq if query else yt)[ids]

    return Task("digits", {"task": "digits", **c}, n, c["n_query"], train, forward, classes=10)


TAGGER = {"n_train": 400, "n_query": 60, "rule_seed": 2, "data_seed": 9, "tags": 4, "flip": 0.05, "steps": 200,
          "batch": 50, "lr": 5e-3, "weight_decay": 1e-2, "seed": 5}


def tagger_task() -> Task:
    c, vocab, classes = TAGGER, TEXT["vocab"], TEXT["classes"]
    tokens, labels = text_data(rule_seed=c["rule_seed"], seed=c["data_seed"])
    rule = np.random.default_rng(c["rule_seed"]).permutation(vocab)[: classes * TEXT["keywords"]].reshape(classes, -1)
    class_of = torch.full((vocab,), classes)  # "other"
    for k in range(classes):
        class_of[torch.from_numpy(rule[k])] = k
    tags = torch.where(class_of[tokens] == labels[:, None], labels[:, None].expand_as(tokens),
                       torch.full_like(tokens, classes))
    rng = np.random.default_rng(c["seed"])
    noise = torch.from_numpy(rng.random(tags.shape) < c["flip"])
    tags[noise] = torch.from_numpy(rng.integers(0, c["tags"], int(noise.sum())))
    n, nq = c["n_train"], c["n_query"]
    xt, yt, xq, yq = tokens[:n], tags[:n], tokens[n:n + nq], tags[n:n + nq]

    def make(seed):
        torch.manual_seed(seed)
        return Encoder(vocab, TEXT["seq"], TEXT["d"], TEXT["heads"], c["tags"], pool=False)

    def train(mask, seed):
        model, sel = make(seed), torch.from_numpy(np.flatnonzero(mask))
        loss = lambda i: F.cross_entropy(model(xt[sel[i]]).reshape(-1, c["tags"]), yt[sel[i]].reshape(-1),  # noqa: E731
                                         reduction="sum")
        return fit(model, loss, len(sel), c["steps"], c["lr"], c["weight_decay"], batch=c["batch"], seed=seed)

    def forward(model, ids, query):
        return model((xq if query else xt)[ids]), (yq if query else yt)[ids]

    return Task("tagger", {"task": "tagger", **c}, n, nq, train, forward, classes=c["tags"])


GPT2B = {"data_seed": 5}


def gpt2b_task() -> Task:
    train_tokens, query_tokens, _ = lm_data(seed=GPT2B["data_seed"])

    def forward(model, ids, query):
        tokens = (query_tokens if query else train_tokens)[ids]
        return model(input_ids=tokens).logits[:, :-1], tokens[:, 1:]

    return Task("gpt2b", {"task": "gpt2b", **GPT2B}, len(train_tokens), len(query_tokens),
                lambda m, s: lm_train(train_tokens, m, s), forward, kron_model=conv1d_to_linear)


LATE = {"digits": digits_task, "tagger": tagger_task, "gpt2b": gpt2b_task}
