"""Integrations: dataset extraction and the HuggingFace Trainer callback.

``LogixCallback`` lives in :mod:`logix.integrations.huggingface` (it imports transformers).
"""

from logix.integrations.loop import (
    example_id,
    extract,
    held_fixed,
    loader_with_ids,
    sample_from_logits,
    stable_token_id,
    summed_loss,
)

__all__ = ["example_id", "extract", "held_fixed", "loader_with_ids", "sample_from_logits", "stable_token_id", "summed_loss"]
