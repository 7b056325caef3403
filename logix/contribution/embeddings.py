"""One embedding per record from a frozen LM's last hidden states (the selector's features).

:func:`embed_records` pools the last hidden states over the record's tokens (:class:`Pooling`:
their mean, or the last token's) in a single forward pass, into a logix store when ``store_dir``
is given (crash-safe, resumable, readable without the model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from logix.config import DuplicatePolicy
from logix.config.choices import Pooling
from logix.contribution.lm import keep_logits_kwargs
from logix.core.progress import progress_bar
from logix.data import PromptTemplate
from logix.errors import DataError
from logix.store import Layout, Store
from logix.store.runinfo import normalise_ids
from logix.store.sink import StoreSink

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDING_BLOCK = "embedding"


def record_texts(records: Sequence[Mapping[str, Any]], template: PromptTemplate) -> list[str]:
    return [template.prompt(r) + template.response(r) for r in records]


@torch.no_grad()
def _embed_batch(model: nn.Module, tokenizer, texts: list[str], pooling: Pooling, max_length: int) -> Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    out = model(**enc, output_hidden_states=True, **keep_logits_kwargs(model, 1))  # no full-vocab logits
    hidden = out.hidden_states[-1].float()
    mask = enc["attention_mask"].to(hidden.dtype)
    if pooling is Pooling.MEAN:
        return ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).cpu()
    if tokenizer.padding_side == "left":
        return hidden[:, -1].cpu()
    last = (enc["attention_mask"].sum(1) - 1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].cpu()


def embed_records(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    ids: Sequence,
    *,
    template: PromptTemplate | None = None,
    pooling: Pooling | str = Pooling.MEAN,
    batch_size: int = 16,
    max_length: int = 512,
    store_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """One embedding per record (prompt + response) from a frozen LM's last hidden states.

    Args:
        model: A transformers model that accepts ``output_hidden_states=True``.
        tokenizer: Its tokenizer (needs a pad token).
        records: Instruction records.
        ids: Their ids (unique).
        template: Prompt format (Alpaca by default).
        pooling: ``mean`` over the record's tokens, or the ``last`` token.
        batch_size: Records per forward pass.
        max_length: Tokens kept per record (truncated on the right).
        store_dir: Log the embeddings to a logix store here; records already committed are not
            recomputed (an interrupted pass resumes).
        progress: Show a progress bar.

    Returns:
        ``(len(records), hidden)`` float32 array, in the order of ``records``.

    Raises:
        DataError: Unknown pooling, ids and records disagree, or a record lacks a field.
    """
    try:
        pooling = Pooling(pooling)
    except ValueError:
        raise DataError(f"pooling must be one of {tuple(p.value for p in Pooling)}, got {pooling!r}") from None
    if len(ids) != len(records):
        raise DataError(f"{len(ids)} ids for {len(records)} records")
    if tokenizer.pad_token is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    template = template or PromptTemplate()
    texts = record_texts(records, template)
    was_training = model.training
    model.eval()
    try:
        if store_dir is None:
            chunks = [
                _embed_batch(model, tokenizer, texts[i:i + batch_size], pooling, max_length)
                for i in progress_bar(range(0, len(texts), batch_size), desc="logix embed", unit="batch", enabled=progress)
            ]
            return torch.cat(chunks).numpy()
        return _embed_logged(model, tokenizer, texts, list(ids), pooling, batch_size, max_length,
                             Path(store_dir), progress)
    finally:
        model.train(was_training)


def _embed_logged(model, tokenizer, texts, ids, pooling, batch_size, max_length, store_dir, progress) -> np.ndarray:
    hidden = int(model.config.hidden_size)
    layout = Layout.build([(EMBEDDING_BLOCK, EMBEDDING_BLOCK, (1, hidden))])
    sink = StoreSink(store_dir, layout, "float32", per_token=False, shard_rows=1024, queue_shards=2,
                     duplicates=DuplicatePolicy.ERROR)
    try:
        if sink.writer.manifest["layout"] != layout.to_json():
            raise DataError(f"{store_dir} holds embeddings of another shape; use a new store_dir")
        norm_ids, id_type = normalise_ids(ids)
        sink.check_id_type(id_type)
        todo = [i for i, key in enumerate(norm_ids) if key not in sink.committed]
        for start in progress_bar(range(0, len(todo), batch_size), desc="logix embed", unit="batch",
                                  enabled=progress):
            part = todo[start:start + batch_size]
            rows = _embed_batch(model, tokenizer, [texts[i] for i in part], pooling, max_length)
            keys = [norm_ids[i] for i in part]
            keep = sink.keep_mask(keys)
            sink.add(rows[keep], [k for k, m in zip(keys, keep) if m], None, keys)
    finally:
        sink.close()
    return Store(store_dir).get(norm_ids).float().numpy()
