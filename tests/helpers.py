"""Oracles and tiny models shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import logix
from logix.capture.layers import adapter_for


def per_example_grads(
    model: nn.Module,
    names: list[str],
    n: int,
    loss_of: Callable[[int], Tensor],
) -> dict[str, Tensor]:
    """Canonical ``(d_out, d_in+bias)`` gradients of each module, one backward per example."""
    modules = dict(model.named_modules())
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss_of(i).backward()
        for name in names:
            module = modules[name]
            adapter = adapter_for(module)
            grads = [
                p.grad if p.grad is not None else torch.zeros_like(p) for p in adapter.weights(module)
            ]
            out[name].append(adapter.param_grad_to_canonical(module, grads).detach().clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(v) for name, v in out.items()}


def projected(run: logix.Run, name: str, grads: Tensor) -> Tensor:
    """``P_out^T G P_in`` with the run's projection (identity for none)."""
    proj = run.projections[name]
    g = grads.to(torch.float64)
    if proj.p_out is not None:
        g = proj.p_out.to(torch.float64).T @ g
    if proj.p_in is not None:
        g = g @ proj.p_in.to(torch.float64)
    return g


def logged(store: logix.Store, name: str, ids: list) -> Tensor:
    rows = store.get(ids, modules=[name]).to(torch.float64)
    return rows.reshape(len(ids), *store.layout.block(name).shape)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class TokenModel(nn.Module):
    """Per-token model (no mixing across positions): Embedding -> Linear -> tanh -> Linear."""

    def __init__(self, vocab: int = 11, dim: int = 6, hidden: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.fc = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(self.emb(tokens))))


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, padding=1, dilation=1, padding_mode="reflect", bias=False)
        self.conv3 = nn.Conv2d(3, 2, 2, dilation=2, padding="same")
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    model.eval()
    return model


def lm_token_batch(n: int, seq: int, vocab: int, seed: int = 0):
    """Right-padded token batch with varying lengths, its mask and labels (-100 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
    lengths[0] = seq
    tokens = torch.randint(1, vocab, (n, seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    tokens = tokens * mask
    labels = tokens.masked_fill(mask == 0, -100)
    return tokens, mask, labels, lengths


def lm_summed_loss(model: nn.Module, tokens: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    logits = model(input_ids=tokens, attention_mask=mask).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum",
    )


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad token items (input_ids, labels) into a batch; padding is masked and labelled -100."""
    width = max(len(it["input_ids"]) for it in items)
    pad = [width - len(it["input_ids"]) for it in items]
    return {
        "input_ids": torch.tensor([it["input_ids"] + [0] * p for it, p in zip(items, pad)]),
        "attention_mask": torch.tensor([[1] * len(it["input_ids"]) + [0] * p for it, p in zip(items, pad)]),
        "labels": torch.tensor([it["labels"] + [-100] * p for it, p in zip(items, pad)]),
    }
