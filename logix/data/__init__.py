"""Turning records into examples logix can log: files, tokenizers, templates, datasets, batches.

A typical offline pipeline::

    from logix.data import InstructionDataset, PadCollator, load_jsonl, load_tokenizer

    tokenizer = load_tokenizer("examples/data/tokenizer.json")
    dataset = InstructionDataset(load_jsonl("examples/data/instructions.jsonl"), tokenizer, max_length=64)
    loader = DataLoader(dataset, batch_size=8, collate_fn=PadCollator(tokenizer.pad_token_id))
    for batch in loader:
        with run(data_id=batch["id"], mask=batch["attention_mask"]):
            ...
"""

from __future__ import annotations

from logix.data.build import (
    absolute_paths,
    build_dataset,
    build_datasets,
    build_tokenizer,
    dataset_categories,
    dataset_texts,
    resolve_path,
)
from logix.data.collate import PadCollator, PaddingSide
from logix.data.datasets import IGNORE_INDEX, InstructionDataset, TextDataset
from logix.data.io import load_jsonl, load_tokenizer
from logix.data.template import PromptTemplate, stable_id

__all__ = [
    "IGNORE_INDEX",
    "InstructionDataset",
    "PadCollator",
    "PaddingSide",
    "PromptTemplate",
    "TextDataset",
    "absolute_paths",
    "build_dataset",
    "build_datasets",
    "build_tokenizer",
    "dataset_categories",
    "dataset_texts",
    "load_jsonl",
    "load_tokenizer",
    "resolve_path",
    "stable_id",
]
