"""Response likelihoods after a shared prefix, encoded once: its KV cache is expanded over batches.

:func:`cached_response_nll` is the fast path of the in-context pass (the demonstration block is a
token prefix shared by every probe); it equals scoring each full sequence on its own
(:func:`logix.contribution.lm.response_nll_ids`) to float tolerance.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from logix.contribution.lm import keep_logits_kwargs, token_nll
from logix.errors import DataError


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _expand_cache(cache: Any, batch: int) -> Any:
    """A fresh cache holding the prefix's keys and values ``batch`` times (prefix tensors untouched)."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
                      for layer in layers):
        try:  # plain full-attention layers: share the prefix tensors as stride-0 views, no copy
            data = [(layer.keys.expand(batch, *layer.keys.shape[1:]), layer.values.expand(batch, *layer.values.shape[1:]))
                    for layer in layers]
            return type(cache)(data)
        except TypeError:
            pass
    fresh = copy.deepcopy(cache)
    fresh.batch_repeat_interleave(batch)
    return fresh


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def cached_response_nll(
    model: torch.nn.Module,
    prefix: Sequence[int],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each ``responses[i]`` given ``prefix + prompts[i]``, encoding ``prefix`` once.

    The prefix's KV cache is expanded over right-padded batches of ``prompts[i] + responses[i]``.
    Equal (to float tolerance) to scoring each ``prefix + prompts[i] + responses[i]`` on its own.
    """
    if not prefix:
        raise DataError("cached scoring needs a non-empty prefix")
    device = _device(model)
    kwarg = _cache_kwarg(model)
    n = len(prompts)
    nll = np.zeros(n, dtype=np.float64)
    count = np.array([len(r) for r in responses], dtype=np.int64)
    head = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    out = model(input_ids=head, use_cache=True, **keep_logits_kwargs(model, 1))
    cache = _out_cache(out)
    last = out.logits[0, -1]
    lp = head.shape[1]
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    for lo in range(0, n, batch_size):
        chunk = order[lo:lo + batch_size]
        b = len(chunk)
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.full((b, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, lp + width), dtype=torch.long)
        mask[:, :lp] = 1
        for row, i in enumerate(chunk):
            ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, lp:lp + len(seqs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.arange(lp, lp + width, device=device).unsqueeze(0).expand(b, width)
        first = max(min(len(prompts[i]) for i in chunk) - 1, 0)  # first position whose logits are needed
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{kwarg: _expand_cache(cache, b)}, **keep_logits_kwargs(model, width - first)).logits
        offset = width - logits.shape[1]
        rows, cols = [], []
        for row, i in enumerate(chunk):
            start = len(prompts[i])
            rows.extend([row] * (len(seqs[i]) - start))
            cols.extend(range(start, len(seqs[i])))
        r = torch.tensor(rows, device=device)
        c = torch.tensor(cols, device=device)
        # the logit predicting probe token t is logits[t - 1], or the prefix's last logit for t == 0
        picked = logits[r, (c - 1).clamp(min=0) - offset]
        picked = torch.where((c == 0).unsqueeze(-1), last.to(picked.dtype).unsqueeze(0), picked)
        per_token = token_nll(picked, ids[r, c]).double().cpu()
        sums = torch.zeros(b, dtype=torch.float64).index_add_(0, r.cpu(), per_token)
        nll[chunk] = sums.numpy()
    return nll, count
