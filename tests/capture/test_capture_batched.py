"""The batched reduction of projected modules (``BatchCapture.finish``) against explicit sums.

Modules called twice per forward, with padding masks and with a skipped duplicate example
(``keep``), land in the stacked groups of the batched path with weights that differ from
module to module; their rows and KFAC factors must equal the brute-force references.
"""

from __future__ import annotations

import torch
from torch import nn

import logix
from tests.helpers import logged, per_example_grads, projected, rel_err

N, SEQ = 7, 5


class TwiceModel(nn.Module):
    """Two same-shape Linears, each applied twice (tokens stay independent), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.l1 = nn.Linear(6, 6)
        self.l2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, tokens):
        x = self.emb(tokens)
        x = torch.tanh(self.l1(torch.tanh(self.l1(x))))
        x = torch.tanh(self.l2(torch.tanh(self.l2(x))))
        return self.head(x)


def _data():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(2, SEQ + 1, (N,), generator=gen)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    tokens = torch.randint(1, 11, (N, SEQ), generator=gen)
    labels = torch.randint(0, 4, (N, SEQ), generator=gen)
    return tokens, mask, labels


def _loss(model, tokens, labels):  # includes the padded positions: only the mask removes them
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1), reduction="sum")


class PooledModel(nn.Module):
    """A per-token Linear (token dim 2) and a per-example Linear called twice: both stack as
    (B, 2, k) blocks in one group, with different weights (mask vs keep)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.tok = nn.Linear(6, 6)
        self.vec = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, tokens, mask):
        h = torch.tanh(self.tok(self.emb(tokens)))
        pooled = (h * mask[..., None]).sum(1)  # padded tokens get no gradient
        return self.head(torch.tanh(self.vec(torch.tanh(self.vec(pooled)))))


def _explicit_factors(model, names, run_loss, mask):
    """Unnormalised ``sum_t a_t a_t^T`` and ``sum_t g_t g_t^T`` over every call's real tokens."""
    modules = dict(model.named_modules())
    seen: dict[str, list] = {n: [] for n in names}

    def hook(name):
        def fwd(module, inputs, output):
            output.retain_grad()
            seen[name].append((inputs[0].detach(), output))

        return fwd

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    model.zero_grad()
    run_loss().backward()
    for h in handles:
        h.remove()
    m = mask.bool()
    out = {}
    for name in names:  # token modules keep their real tokens, per-example ones every example
        a = torch.cat([x[m] if x.dim() == 3 else x for x, _ in seen[name]])
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        g = torch.cat([y.grad[m] if y.dim() == 3 else y.grad for _, y in seen[name]])
        out[name] = (a.T @ a, g.T @ g, float(a.shape[0]))
    model.zero_grad()
    return out


def test_modules_called_twice_with_masks_and_skipped_duplicates(tmp_path):
    torch.manual_seed(0)
    model = TwiceModel().double()
    tokens, mask, labels = _data()
    cfg = {
        "projection": {"type": "random", "rank_in": 3, "rank_out": 4, "seed": 11},
        "capture": {"compute_dtype": "float64"},
        "statistics": {"kfac": True},
        "store": {"duplicate_ids": "skip", "dtype": "float32"},  # compared to autograd at 1e-6
    }
    run = logix.init("twice", config=cfg, root=tmp_path)
    names = run.watch(model, modules=["l1", "l2", "head"])
    batches = [[0, 1, 2], [3, 2, 4], [5, 6]]  # example 2 repeats: its second copy is dropped
    for _ in run.plan():
        for ids in batches:
            with run(data_id=ids, mask=mask[ids]):
                _loss(model, tokens[ids], labels[ids]).backward()
    store = run.finalize()

    def single(i):
        n = int(mask[i].sum())
        return _loss(model, tokens[i : i + 1, :n], labels[i : i + 1, :n])

    oracle = per_example_grads(model, names, N, single)
    ids = list(range(N))
    assert store.n_rows == N
    for name in names:
        assert rel_err(logged(store, name, ids), projected(run, name, oracle[name])) < 1e-6, name  # float32 rows

    # the statistics see every kept example once (the repeat of example 2 is not counted)
    kept = [0, 1, 2, 3, 4, 5, 6]
    factors = _explicit_factors(model, names, lambda: _loss(model, tokens[kept], labels[kept]), mask[kept])
    stats = run.statistics
    for name in names:
        a_full, s_full, count = factors[name]
        p_in, p_out = run.projections[name].p_in.double(), run.projections[name].p_out.double()
        assert stats.count(name, "tokens") == count, name
        assert rel_err(stats.raw_sum(name, "A"), p_in.T @ a_full @ p_in) < 1e-10, name
        assert rel_err(stats.raw_sum(name, "S"), p_out.T @ s_full @ p_out) < 1e-10, name
        assert stats.count(name, "examples") == N


def test_one_group_with_token_and_per_example_weights(tmp_path):
    torch.manual_seed(0)
    model = PooledModel().double()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 11, (N, 2), generator=gen)
    mask = torch.ones(N, 2, dtype=torch.long)
    mask[::2, 1] = 0  # every other example has one real token
    labels = torch.randint(0, 4, (N,), generator=gen)

    def loss(t, m, y):
        return nn.functional.cross_entropy(model(t, m.double()), y, reduction="sum")

    cfg = {
        "projection": {"type": "random", "rank_in": 3, "rank_out": 4, "seed": 2},
        "capture": {"compute_dtype": "float64"},
        "statistics": {"kfac": True},
        "store": {"duplicate_ids": "skip", "dtype": "float32"},  # compared to autograd at 1e-6
    }
    run = logix.init("pooled", config=cfg, root=tmp_path)
    names = run.watch(model, modules=["tok", "vec"])
    for _ in run.plan():
        for ids in ([0, 1, 2], [3, 2, 4], [5, 6]):  # the repeat of example 2 is dropped (keep)
            with run(data_id=ids, mask=mask[ids]):
                loss(tokens[ids], mask[ids], labels[ids]).backward()
    store = run.finalize()

    def single(i):
        n = int(mask[i].sum())
        return loss(tokens[i : i + 1, :n], mask[i : i + 1, :n], labels[i : i + 1])

    oracle = per_example_grads(model, names, N, single)
    for name in names:
        got = logged(store, name, list(range(N)))
        assert rel_err(got, projected(run, name, oracle[name])) < 1e-6, name  # float32 rows

    factors = _explicit_factors(model, names, lambda: loss(tokens, mask, labels), mask)
    for name in names:
        a_full, s_full, count = factors[name]
        p_in, p_out = run.projections[name].p_in.double(), run.projections[name].p_out.double()
        assert run.statistics.count(name, "tokens") == count, name
        assert rel_err(run.statistics.raw_sum(name, "A"), p_in.T @ a_full @ p_in) < 1e-10, name
        assert rel_err(run.statistics.raw_sum(name, "S"), p_out.T @ s_full @ p_out) < 1e-10, name
