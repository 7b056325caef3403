"""Logged per-example gradients against autograd (one backward per example)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from tests.helpers import (
    ConvModel,
    TokenModel,
    lm_summed_loss,
    lm_token_batch,
    logged,
    per_example_grads,
    projected,
    rel_err,
    tiny_gpt2,
)

TOL = 1e-5


def _config(projection: str, **extra) -> dict:
    cfg = {
        "projection": {"type": projection, "rank_in": 3, "rank_out": 4, "seed": 7},
        "capture": {"compute_dtype": "float64", "trainable_only": False},
        "store": {"dtype": "float32"},  # the rows are compared to autograd gradients
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def _log_batches(run: logix.Run, n: int, batch: int, step) -> logix.Store:
    for _ in run.plan():
        for lo in range(0, n, batch):
            ids = list(range(lo, min(lo + batch, n)))
            with run(data_id=ids, mask=step.mask(ids)):
                step.loss(ids).backward()
    return run.finalize()


class _TokenStep:
    """Batched loss that deliberately includes padding positions: the mask must drop them."""

    def __init__(self, model, tokens, mask, labels):
        self.model, self.tokens, self.mask_, self.labels = model, tokens, mask, labels

    def mask(self, ids):
        return self.mask_[ids]

    def loss(self, ids):
        logits = self.model(self.tokens[ids])
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.labels[ids].reshape(-1), reduction="sum"
        )

    def single(self, i):  # oracle: the unpadded example alone
        length = int(self.mask_[i].sum())
        logits = self.model(self.tokens[i : i + 1, :length])
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.labels[i, :length], reduction="sum"
        )


@pytest.mark.parametrize("projection", ["none", "random"])
def test_token_model_linear_embedding_with_padding(tmp_path, projection):
    torch.manual_seed(0)
    model = TokenModel().double()
    n, seq = 10, 7
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    tokens = torch.randint(1, 11, (n, seq), generator=gen)
    labels = torch.randint(0, 4, (n, seq), generator=gen)
    # padded positions get real token ids (not padding_idx), so only the mask can remove them
    step = _TokenStep(model, tokens, mask, labels)
    run = logix.init("t", config=_config(projection), root=tmp_path)
    names = run.watch(model)
    assert names == ["emb", "fc", "head"]
    store = _log_batches(run, n, 4, step)
    oracle = per_example_grads(model, names, n, step.single)
    for name in names:
        assert rel_err(logged(store, name, list(range(n))), projected(run, name, oracle[name])) < TOL


def test_embedding_padding_idx_gets_no_gradient(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens = torch.tensor([[3, 0, 5, 0], [0, 0, 2, 7]])
    labels = torch.tensor([[1, 2, 3, 0], [1, 1, 0, 2]])
    step = _TokenStep(model, tokens, torch.ones_like(tokens), labels)
    run = logix.init("t", config=_config("none"), root=tmp_path)
    run.watch(model, modules=["emb"])
    store = _log_batches(run, 2, 2, step)
    oracle = per_example_grads(model, ["emb"], 2, lambda i: step.loss([i]))
    got = logged(store, "emb", [0, 1])
    assert rel_err(got, oracle["emb"]) < TOL
    assert got[:, :, 0].abs().max() == 0  # padding_idx column


@pytest.mark.parametrize("projection", ["none", "random"])
def test_gpt2_conv1d_embeddings_lm_head(tmp_path, projection):
    model = tiny_gpt2()
    n, seq = 6, 12
    tokens, mask, labels, lengths = lm_token_batch(n, seq, 37)

    class Step:
        def mask(self, ids):
            return mask[ids]

        def loss(self, ids):
            return lm_summed_loss(model, tokens[ids], mask[ids], labels[ids])

    def single(i):
        length = int(lengths[i])
        return lm_summed_loss(model, tokens[i : i + 1, :length], mask[i : i + 1, :length], labels[i : i + 1, :length])

    run = logix.init("g", config=_config(projection), root=tmp_path)
    names = run.watch(model)
    assert {"transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_attn", "lm_head"} <= set(names)
    store = _log_batches(run, n, 3, Step())
    oracle_names = [m for m in names if m not in ("lm_head", "transformer.wte")]
    oracle = per_example_grads(model, oracle_names, n, single)
    ids = list(range(n))
    for name in oracle_names:
        assert rel_err(logged(store, name, ids), projected(run, name, oracle[name])) < TOL, name
    # lm_head and wte share one weight: their logged gradients add up to its autograd gradient
    tied = _tied_oracle(model, n, single)
    if projection == "none":
        total = logged(store, "lm_head", ids) + logged(store, "transformer.wte", ids).transpose(1, 2)
        assert rel_err(total, tied) < TOL


def _tied_oracle(model, n, single):
    out = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        single(i).backward()
        out.append(model.lm_head.weight.grad.detach().clone())
    return torch.stack(out)


@pytest.mark.parametrize("projection", ["none", "random"])
def test_conv2d_stride_dilation_padding_modes(tmp_path, projection):
    torch.manual_seed(0)
    model = ConvModel().double()
    n = 5
    x = torch.randn(n, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))

    class Step:
        def mask(self, ids):
            return None

        def loss(self, ids):
            return nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="sum")

    run = logix.init("c", config=_config(projection), root=tmp_path)
    names = run.watch(model)
    assert names == ["conv1", "conv2", "conv3", "fc"]
    store = _log_batches(run, n, 2, Step())
    oracle = per_example_grads(model, names, n, lambda i: Step().loss([i]))
    for name in names:
        assert rel_err(logged(store, name, list(range(n))), projected(run, name, oracle[name])) < TOL, name


@pytest.mark.parametrize("projection", ["none", "random"])
def test_peft_lora_inner_linears(tmp_path, projection):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    base = MLP().double()
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    for name, p in model.named_parameters():  # non-zero B so that A receives gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    config = _config(projection)
    config["capture"]["trainable_only"] = True
    run = logix.init("l", config=config, root=tmp_path)
    names = run.watch(model)
    assert names and all("lora_A" in m or "lora_B" in m for m in names)
    assert len(names) == 4

    class Step:
        def mask(self, ids):
            return None

        def loss(self, ids):
            return nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="sum")

    store = _log_batches(run, 7, 3, Step())
    oracle = per_example_grads(model, names, 7, lambda i: Step().loss([i]))
    for name in names:
        assert rel_err(logged(store, name, list(range(7))), projected(run, name, oracle[name])) < TOL, name


def test_module_called_twice_sums_both_calls(tmp_path):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.l = nn.Linear(4, 4).double()
    shared = holder.l
    x = torch.randn(6, 4, dtype=torch.float64)

    def loss(ids):
        return (torch.tanh(shared(torch.tanh(shared(x[ids])))) ** 2).sum()

    run = logix.init("twice", config=_config("none"), root=tmp_path)
    run.watch(holder)
    for lo in (0, 3):
        with run(data_id=list(range(lo, lo + 3))):
            loss(list(range(lo, lo + 3))).backward()
    store = run.finalize()
    oracle = per_example_grads(holder, ["l"], 6, lambda i: loss([i]))
    got = store.read_all().to(torch.float64).reshape(6, 4, 5)
    assert rel_err(got, oracle["l"]) < TOL


def test_float32_model_float32_compute(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x, y = torch.randn(9, 8), torch.randint(0, 4, (9,))
    run = logix.init(
        "f32",
        config={"projection": {"type": "random", "rank_in": 5, "rank_out": 3}, "store": {"dtype": "float32"}},
        root=tmp_path,
    )
    names = run.watch(model)
    for lo in range(0, 9, 3):
        ids = list(range(lo, lo + 3))
        with run(data_id=ids):
            nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    store = run.finalize()
    oracle = per_example_grads(
        model, names, 9, lambda i: nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
    )
    for name in names:
        assert rel_err(logged(store, name, list(range(9))), projected(run, name, oracle[name])) < 1e-5
