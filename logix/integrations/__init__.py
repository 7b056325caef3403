"""Integrations: dataset extraction and the HuggingFace Trainer callback.

``LogixCallback`` lives in :mod:`logix.integrations.huggingface` (it imports transformers).
"""

from logix.integrations.batches import example_id, loader_with_ids, stable_token_id
from logix.integrations.loop import extract, held_fixed
from logix.integrations.losses import sample_from_logits, summed_loss
from logix.integrations.models import build_model, with_lora
from logix.integrations.score import score

__all__ = [
    "build_model",
    "example_id",
    "extract",
    "held_fixed",
    "loader_with_ids",
    "sample_from_logits",
    "score",
    "stable_token_id",
    "summed_loss",
    "with_lora",
]
