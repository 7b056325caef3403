"""The tasks of ``bench_suite.py``: small seeded models on generated data, each retrainable in seconds.

Every task is a :class:`Task`: ``train(mask, seed)`` trains the recipe from the initialisation of
``seed`` on the train examples ``mask`` selects (deterministic), ``forward(model, ids, query)``
returns ``(logits, targets)`` of train (or query) examples, and the measured output of a query is
its negated summed loss (for a classifier, monotone in the correct-class margin, so per-query
Spearman ranks are the same). Train and query sets are disjoint draws of the same generator.

* ``mlp``: ``bench_lds``'s classifier (``make_classification``, MLP 20-64-64-4, full-batch Adam).
* ``cnn``: 12x12 one-channel images of 4 classes (a class template, randomly shifted, plus noise
  and a distractor template); a 5x5 and a 3x3 convolution (tanh), global max pooling and a linear head, full-batch Adam (L2).
* ``text``: token sequences whose class is decided by class keywords hidden among noise tokens
  (with 5% flipped labels); a one-layer transformer encoder (d=32, 2 heads, mean pooling) built
  from ``nn.Linear`` / ``nn.Embedding``, minibatch Adam.
* ``lm``: ``bench_lds``'s tiny GPT-2 (2 layers, d=32) on four generated sequence families.
* ``lora``: the ``text`` encoder pretrained on one keyword->class rule, then fine-tuned with
  LoRA (peft, r=4 on q/v/mlp, everything else frozen) on a remapped rule; only the adapters
  are retrained on subsets and attributed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from bench_lds import CLF, LM, clf_data, clf_train, lm_data, lm_train
from torch import nn


@dataclass
class Task:
    """One benchmark task (see the module docstring)."""

    name: str
    recipe: dict  # hashed into the ground-truth cache name
    n_train: int
    n_query: int
    train: Callable[[np.ndarray, int], nn.Module]
    forward: Callable[[nn.Module, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
    classes: int = 0  # > 0: a classifier (expected Fisher possible)
    modules: tuple[str, ...] = ()  # capture.modules of the logix runs (empty: all supported)
    kron_modules: list[str] | None = None  # kronfluence's tracked modules (None: every Linear/Conv2d)
    kron_model: Callable[[nn.Module], nn.Module] = field(default=copy.deepcopy)

    def loss(self, model: nn.Module, ids, query: bool, labels: dict | None = None) -> torch.Tensor:
        """Summed loss of examples ``ids``; ``labels`` is ``{}`` (the data's labels) or a statistics
        pass's ``loss_kwargs`` (``generator``: labels drawn from the model; ``label_class``: expected)."""
        from logix.integrations.losses import expected_class_loss

        logits, target = self.forward(model, torch.as_tensor(ids), query)
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        labels = labels or {}
        if "label_class" in labels:
            return expected_class_loss(logits, target, labels["label_class"], labels["num_classes"])
        if labels.get("generator") is not None:
            target = torch.multinomial(logits.detach().softmax(-1), 1, generator=labels["generator"])[:, 0]
        return F.cross_entropy(logits, target, reduction="sum")

    def outputs(self, model: nn.Module) -> np.ndarray:
        """``(n_query,)`` negated summed query losses: the measurement whose rise the scores predict."""
        with torch.no_grad():
            logits, target = self.forward(model, torch.arange(self.n_query), True)
            per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            return -per.view(self.n_query, -1).sum(1).numpy()


def fit(model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int, lr: float,
        weight_decay: float = 0.0, batch: int | None = None, seed: int = 0,
        optimizer: Callable | None = None) -> nn.Module:
    """Adam (cosine schedule) on the mean loss; full batch, or seeded minibatches of ``batch``
    (``optimizer``: builds another optimizer from the parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer else torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)  # L2
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if batch is None:
            idx = torch.arange(n)
        else:
            if len(order) < batch:
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            idx, order = order[:batch], order[batch:]
        opt.zero_grad()
        (loss_of(idx) / len(idx)).backward()
        opt.step()
        sched.step()
    return model


# ---- mlp (bench_lds's classifier) --------------------------------------------------------------
def mlp_task() -> Task:
    xt, yt, xq, yq = clf_data()

    def forward(model, ids, query):
        return model((xq if query else xt)[ids]), (yq if query else yt)[ids]

    return Task("mlp", {"task": "mlp", **CLF}, len(xt), len(xq), lambda m, s: clf_train(xt, yt, m, s), forward,
                classes=CLF["classes"])


# ---- cnn -----------------------------------------------------------------------------------------
CNN = {"n_train": 500, "n_query": 60, "size": 12, "classes": 4, "noise": 0.8, "steps": 300, "lr": 1e-2,
       "weight_decay": 3e-2, "opt": "adam-l2", "seed": 0}


def cnn_data() -> tuple[torch.Tensor, ...]:
    c, rng = CNN, np.random.default_rng(CNN["seed"])
    s, k = c["size"], c["classes"]
    templates = rng.normal(size=(k, 5, 5))
    n = c["n_train"] + c["n_query"]
    y = rng.integers(0, k, n)
    x = rng.normal(scale=c["noise"], size=(n, 1, s, s))
    for i in range(n):
        for cls, scale in ((y[i], 1.0), (rng.integers(k), 0.5)):  # the class template and a distractor
            r, col = rng.integers(0, s - 4, 2)
            x[i, 0, r:r + 5, col:col + 5] += scale * templates[cls]
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    m = c["n_train"]
    return x[:m], y[:m], x[m:], y[m:]


def cnn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 5), nn.Tanh(), nn.Conv2d(8, 16, 3), nn.Tanh(), nn.AdaptiveMaxPool2d(1),
                         nn.Flatten(), nn.Linear(16, CNN["classes"]))


def cnn_task() -> Task:
    xt, yt, xq, yq = cnn_data()

    def forward(model, ids, query):
        return model((xq if query else xt)[ids]), (yq if query else yt)[ids]

    def train(mask, seed):
        model, sel = cnn_model(seed), torch.from_numpy(np.flatnonzero(mask))
        return fit(model, lambda i: F.cross_entropy(model(xt[sel[i]]), yt[sel[i]], reduction="sum"), len(sel),
                   CNN["steps"], CNN["lr"], CNN["weight_decay"])

    return Task("cnn", {"task": "cnn", **CNN}, len(xt), len(xq), train, forward, classes=CNN["classes"])


# ---- text classifier (a small transformer encoder) -----------------------------------------------
TEXT = {"n_train": 400, "n_query": 60, "vocab": 64, "seq": 12, "classes": 3, "keywords": 4, "flip": 0.05,
        "d": 32, "heads": 2, "steps": 200, "batch": 50, "lr": 5e-3, "weight_decay": 1e-2, "opt": "adam-l2", "seed": 0}


def text_data(rule_seed: int = 0, seed: int = 0, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, labels)``: each class owns ``keywords`` tokens (``rule_seed`` assigns them); a
    sequence holds 2-3 keywords of its class, 0-1 of another, the rest noise tokens."""
    c = TEXT
    rule = np.random.default_rng(rule_seed).permutation(c["vocab"])[: c["classes"] * c["keywords"]]
    rule = rule.reshape(c["classes"], c["keywords"])
    rng = np.random.default_rng(1000 + seed)
    n = n or c["n_train"] + c["n_query"]
    y = rng.integers(0, c["classes"], n)
    tokens = rng.integers(0, c["vocab"], (n, c["seq"]))
    for i in range(n):
        pos = rng.permutation(c["seq"])
        own = rng.integers(2, 4)
        tokens[i, pos[:own]] = rng.choice(rule[y[i]], own)
        if rng.random() < 0.5:
            tokens[i, pos[own]] = rng.choice(rule[(y[i] + rng.integers(1, c["classes"])) % c["classes"]])
    flip = rng.random(n) < c["flip"]
    y[flip] = rng.integers(0, c["classes"], flip.sum())
    return torch.tensor(tokens), torch.tensor(y)


class Encoder(nn.Module):
    """One pre-norm transformer encoder layer over token + position embeddings, mean-pooled
    (``pool=False``: the head on every token)."""

    def __init__(self, vocab: int, seq: int, d: int, heads: int, classes: int, pool: bool = True):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(t).expand(b, t))  # batch-first: per-example rows
        x = self.ln1(h)
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        att = (split(self.q(x)) @ split(self.k(x)).transpose(-1, -2)) / math.sqrt(x.shape[-1] // self.heads)
        h = h + self.o((att.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(b, t, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        h = self.ln3(h)
        return self.head(h.mean(1) if self.pool else h)


def text_model(seed: int) -> Encoder:
    torch.manual_seed(seed)
    c = TEXT
    return Encoder(c["vocab"], c["seq"], c["d"], c["heads"], c["classes"])


def _classifier_task(name: str, recipe: dict, tokens, labels, n_train: int, make: Callable[[int], nn.Module],
                     steps: int, lr: float, weight_decay: float, **kw) -> Task:
    xt, yt, xq, yq = tokens[:n_train], labels[:n_train], tokens[n_train:], labels[n_train:]

    def forward(model, ids, query):
        return model((xq if query else xt)[ids]), (yq if query else yt)[ids]

    def train(mask, seed):
        model, sel = make(seed), torch.from_numpy(np.flatnonzero(mask))
        return fit(model, lambda i: F.cross_entropy(model(xt[sel[i]]), yt[sel[i]], reduction="sum"), len(sel),
                   steps, lr, weight_decay, batch=TEXT["batch"], seed=seed)

    return Task(name, recipe, len(xt), len(xq), train, forward, classes=TEXT["classes"], **kw)


def text_task() -> Task:
    tokens, labels = text_data()
    c = TEXT
    return _classifier_task("text", {"task": "text", **c}, tokens, labels, c["n_train"], text_model, c["steps"],
                            c["lr"], c["weight_decay"])


# ---- LoRA fine-tune of the text encoder ----------------------------------------------------------
LORA = {"n_train": 300, "n_query": 60, "pretrain": 1500, "pretrain_steps": 300, "rank": 4, "alpha": 8,
        "targets": ["q", "v", "fc1"], "steps": 150, "lr": 1e-2, "rule_shift": 1, "opt": "adam-l2", "seed": 0}


def lora_task() -> Task:
    from peft import LoraConfig, get_peft_model

    c = LORA
    base = text_model(0)
    pre_tokens, pre_labels = text_data(rule_seed=0, seed=7, n=c["pretrain"])
    fit(base, lambda i: F.cross_entropy(base(pre_tokens[i]), pre_labels[i], reduction="sum"), c["pretrain"],
        c["pretrain_steps"], TEXT["lr"], TEXT["weight_decay"], batch=TEXT["batch"])
    # the fine-tune data follows a second keyword rule (a shifted task)
    tokens, labels = text_data(rule_seed=c["rule_shift"], seed=8, n=c["n_train"] + c["n_query"])
    base_state = copy.deepcopy(base.state_dict())

    def make(seed):
        model = text_model(0)
        model.load_state_dict(base_state)
        torch.manual_seed(seed)
        cfg = LoraConfig(r=c["rank"], lora_alpha=c["alpha"], target_modules=c["targets"], lora_dropout=0.0,
                         init_lora_weights="gaussian")
        return get_peft_model(model, cfg)

    probe = make(0)
    names = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear) and ".lora_" in n]
    return _classifier_task("lora", {"task": "lora", **c}, tokens, labels, c["n_train"], make, c["steps"], c["lr"],
                            0.0, kron_modules=names)


# ---- lm (bench_lds's tiny GPT-2) -----------------------------------------------------------------
def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A copy of a GPT-2 whose ``Conv1D`` layers are ``nn.Linear`` (same function): kronfluence
    tracks Linear and Conv2d only."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data.copy_(child.weight.data.T)
                lin.bias.data.copy_(child.bias.data)
                setattr(module, child_name, lin)
    return model


def lm_task() -> Task:
    train_tokens, query_tokens, _ = lm_data()

    def forward(model, ids, query):
        tokens = (query_tokens if query else train_tokens)[ids]
        return model(input_ids=tokens).logits[:, :-1], tokens[:, 1:]

    return Task("lm", {"task": "lm", **LM}, len(train_tokens), len(query_tokens),
                lambda m, s: lm_train(train_tokens, m, s), forward, kron_model=conv1d_to_linear)


TASKS: dict[str, Callable[[], Task]] = {"mlp": mlp_task, "cnn": cnn_task, "text": text_task, "lm": lm_task,
                                        "lora": lora_task}
