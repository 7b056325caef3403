"""Activation checkpointing: the recomputed forward is not captured twice, in either of torch's modes.

A checkpointed segment runs its forward again during backward. Non-reentrant checkpointing keeps
the first forward's graph (its recomputation only restores saved tensors); reentrant
checkpointing runs the first forward without gradients and backpropagates through the
recomputation. Either way every row and statistic equals the run without checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import logix


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blocks, self.out = nn.Linear(6, 8), nn.ModuleList([Block(8), Block(8)]), nn.Linear(8, 3)
        self.mode = mode

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h) if self.mode is None else checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.out(h)


def _log(tmp_path, name: str, model: nn.Module, x, y, config):
    run = logix.init(name, root=tmp_path, config=config)
    run.watch(model)
    for _ in run.plan():
        for lo in (0, 5):
            with run(data_id=list(range(lo, lo + 5))):
                nn.functional.cross_entropy(model(x[lo:lo + 5]), y[lo:lo + 5], reduction="sum").backward()
            model.zero_grad()
    store = run.finalize()
    return store, run.statistics


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("ptype", ["random", "none"])
def test_checkpointed_blocks_log_what_plain_blocks_log(tmp_path, mode, ptype):
    torch.manual_seed(1)
    x, y = torch.randn(10, 6, requires_grad=mode == "reentrant"), torch.randint(0, 3, (10,))
    config = {"projection": {"type": ptype, "rank_in": 4, "rank_out": 4}, "statistics": {"ekfac": True}}
    plain, plain_stats = _log(tmp_path, "plain", Net(None), x, y, config)
    ckpt, ckpt_stats = _log(tmp_path, "ckpt", Net(mode), x, y, config)
    ids = list(range(10))
    torch.testing.assert_close(ckpt.get(ids), plain.get(ids), rtol=1e-5, atol=1e-6)
    for name in ("blocks.0.fc1", "blocks.1.fc2", "out"):
        for key in ("A", "S", "ekfac"):
            torch.testing.assert_close(ckpt_stats.mean(name, key), plain_stats.mean(name, key))


def test_hf_gradient_checkpointing_matches(tmp_path):
    transformers = pytest.importorskip("transformers")

    def model(checkpointing: bool | None):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, use_cache=False)
        m = transformers.GPT2LMHeadModel(cfg).train()
        if checkpointing is not None:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        return m

    tokens = torch.randint(0, 64, (4, 12))
    rows = {}
    for checkpointing in (None, True, False):
        run = logix.init(f"gpt2-{checkpointing}", root=tmp_path)
        m = model(checkpointing)
        run.watch(m)
        with run(data_id=list(range(4))):
            (m(input_ids=tokens, labels=tokens).loss * 4).backward()
        rows[checkpointing] = run.finalize().get(list(range(4)))
    torch.testing.assert_close(rows[True], rows[None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[False], rows[None], rtol=1e-5, atol=1e-6)
