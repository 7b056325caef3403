"""Two more held-out tasks of ``bench_suite.py``, added after the defaults were chosen: a check of
the defaults on models and data unlike the ones they were chosen (or first checked) on.

* ``mlp-relu``: a deeper ReLU MLP (3 hidden layers of 48) on another ``make_classification`` draw
  (30 features, 5 classes, one cluster per class), minibatch SGD with momentum, no weight decay.
* ``llama``: a LLaMA-style causal LM (``transformers.LlamaConfig``: RMSNorm, SwiGLU, rotary
  positions, grouped-query attention, untied head; 2 layers, d=48) on another draw of
  ``bench_lds``'s four sequence families.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from bench_lds import lm_data
from sklearn.datasets import make_classification
from suite_tasks import Task, fit
from torch import nn

RELU = {"n_train": 800, "n_query": 80, "features": 30, "classes": 5, "hidden": 48, "depth": 3, "class_sep": 1.2,
        "steps": 400, "batch": 100, "lr": 0.05, "momentum": 0.9, "opt": "sgd", "seed": 7}


def relu_task() -> Task:
    c = RELU
    x, y = make_classification(n_samples=c["n_train"] + c["n_query"], n_features=c["features"], n_informative=12,
                               n_redundant=6, n_classes=c["classes"], n_clusters_per_class=1, flip_y=0.03,
                               class_sep=c["class_sep"], random_state=c["seed"])
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    n = c["n_train"]
    xt, yt, xq, yq = x[:n], y[:n], x[n:], y[n:]

    def make(seed):
        torch.manual_seed(seed)
        dims = [c["features"]] + [c["hidden"]] * c["depth"]
        layers = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        return nn.Sequential(*layers, nn.Linear(c["hidden"], c["classes"]))

    def train(mask, seed):
        model, sel = make(seed), torch.from_numpy(np.flatnonzero(mask))
        opt = lambda params: torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"])  # noqa: E731
        return fit(model, lambda i: F.cross_entropy(model(xt[sel[i]]), yt[sel[i]], reduction="sum"), len(sel),
                   c["steps"], c["lr"], batch=c["batch"], seed=seed, optimizer=opt)

    def forward(model, ids, query):
        return model((xq if query else xt)[ids]), (yq if query else yt)[ids]

    return Task("mlp-relu", {"task": "mlp-relu", **c}, n, c["n_query"], train, forward, classes=c["classes"])


LLAMA = {"n_train": 320, "n_query": 64, "vocab": 128, "seq": 20, "families": 4, "hidden": 48, "intermediate": 96,
         "layers": 2, "heads": 4, "kv_heads": 2, "epochs": 25, "batch": 32, "lr": 3e-3, "data_seed": 1, "seed": 0}


def llama_task() -> Task:
    c = LLAMA
    train_tokens, query_tokens, _ = lm_data(seed=c["data_seed"])

    def make(seed):
        transformers.logging.set_verbosity_error()
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"],
                                       intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
                                       num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                                       max_position_embeddings=c["seq"], tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg).eval()

    def forward(model, ids, query):
        tokens = (query_tokens if query else train_tokens)[ids]
        return model(input_ids=tokens).logits[:, :-1], tokens[:, 1:]

    def train(mask, seed):
        model = make(seed)
        data = train_tokens[torch.from_numpy(mask)]
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(c["epochs"]):
            for idx in torch.randperm(len(data), generator=gen).split(c["batch"]):
                opt.zero_grad()
                logits = model(input_ids=data[idx]).logits[:, :-1]
                F.cross_entropy(logits.reshape(-1, c["vocab"]), data[idx][:, 1:].reshape(-1)).backward()
                opt.step()
        return model

    return Task("llama", {"task": "llama", **c}, len(train_tokens), len(query_tokens), train, forward)


HOLDOUT = {"mlp-relu": relu_task, "llama": llama_task}
