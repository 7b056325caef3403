"""The tokenizer and datasets a config names, and what a report or a summary reads from them.

What ``logix run`` / ``logix extract`` build from the ``model.tokenizer`` and ``data`` sections,
and the texts and categories of the built datasets (for result summaries and reports).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from logix.config import Config, DataFormat
from logix.data.datasets import InstructionDataset, TextDataset
from logix.data.io import load_jsonl, load_tokenizer
from logix.errors import ConfigError


def resolve_path(path: str, config_dir: Path | None) -> Path:
    """A data path as given (relative to the cwd), else relative to the config file's folder.

    Args:
        path: The path the config names (``~`` expanded).
        config_dir: The config file's folder, or None.

    Returns:
        ``path`` when it is absolute, exists, or there is no ``config_dir``; else the path beside
        the config when that exists; else ``path`` (its absence is reported where it is opened).
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or config_dir is None:
        return candidate
    beside = config_dir / candidate
    return beside if beside.exists() else candidate


def absolute_paths(config: Config, config_dir: Path | None) -> Config:
    """The config with its existing local data / tokenizer paths made absolute, so that the
    ``job.yaml`` written beside the outputs replays from any folder.

    Args:
        config: The job's config.
        config_dir: The config file's folder, or None.

    Returns:
        A copy with ``data.train``, ``data.queries`` and ``model.tokenizer`` absolute where they
        name existing files (hub names and missing paths stay as they are).
    """

    def fix(value: str) -> str:
        path = resolve_path(value, config_dir) if value else None
        return str(path.resolve()) if path is not None and path.exists() else value

    data = dataclasses.replace(config.data, train=fix(config.data.train), queries=fix(config.data.queries))
    model = dataclasses.replace(config.model, tokenizer=fix(config.model.tokenizer))
    return config.replace(data=data, model=model)


def build_tokenizer(config: Config, config_dir: Path | None = None):
    """The tokenizer ``model.tokenizer`` names (a tokenizer.json, a folder or a hub name).

    Args:
        config: The job's config (``model.tokenizer``, else ``model.name``).
        config_dir: The config file's folder: relative paths are also looked for there.

    Returns:
        tokenizer (PreTrainedTokenizerBase): The tokenizer (:func:`load_tokenizer`).

    Raises:
        ConfigError: Neither ``model.tokenizer`` nor ``model.name`` is set.
    """
    name = config.model.tokenizer or config.model.name
    if not name:
        raise ConfigError("Set model.tokenizer (a tokenizer.json file, a folder or a hub name) or model.name.")
    local = resolve_path(name, config_dir)
    return load_tokenizer(str(local) if local.exists() else name)


def build_datasets(config: Config, tokenizer, config_dir: Path | None = None):
    """The train and query datasets of a job (``data.train``, ``data.queries``).

    Args:
        config: The job's config.
        tokenizer (PreTrainedTokenizerBase): The tokenizer (:func:`build_tokenizer`).
        config_dir: The config file's folder: relative paths are also looked for there.

    Returns:
        datasets (tuple): ``(train, queries)``; queries is None when ``data.queries`` is empty.

    Raises:
        ConfigError: ``data.train`` is empty.
        DataError: A file cannot be read, or a record cannot be turned into an example.
    """
    dc = config.data
    if not dc.train:
        raise ConfigError("data.train is empty: name a JSONL file of training records.")
    train = build_dataset(resolve_path(dc.train, config_dir), dc.limit_train, config, tokenizer)
    queries = None
    if dc.queries:
        queries = build_dataset(resolve_path(dc.queries, config_dir), dc.limit_queries, config, tokenizer)
    return train, queries


def build_dataset(path: Path, limit: int, config: Config, tokenizer) -> InstructionDataset | TextDataset:
    """The dataset of one JSONL file in ``data.format`` (``text`` or ``instruction``).

    Args:
        path: The JSONL file.
        limit: Keep its first ``limit`` records; 0: all.
        config: The job's config (its ``data`` section).
        tokenizer (PreTrainedTokenizerBase): The tokenizer.

    Returns:
        A :class:`TextDataset` or an :class:`InstructionDataset`.

    Raises:
        DataError: The file cannot be read, or a record cannot be turned into an example.
    """
    dc = config.data
    records = load_jsonl(path)
    if limit:
        records = records[:limit]
    if dc.format is DataFormat.TEXT:
        return TextDataset(records, tokenizer, dc.max_length, text_field=dc.text_field,
                           id_field=dc.id_field, ids=dc.ids)
    return InstructionDataset(records, tokenizer, dc.max_length, train_on=dc.train_on,
                              id_field=dc.id_field, ids=dc.ids)


def dataset_texts(dataset) -> dict[Any, str]:
    """Every item's id -> its text (an instruction example's prompt and response joined).

    Args:
        dataset (TextDataset | InstructionDataset): The dataset.

    Returns:
        ``{id: text}`` in the dataset's order.
    """
    out = {}
    for i, item_id in enumerate(dataset.ids):
        out[item_id] = "".join(dataset.texts(i)) if hasattr(dataset, "texts") else dataset.text(i)
    return out


def dataset_categories(dataset, config: Config) -> dict[Any, Any] | None:
    """Every item's id -> its record's ``data.category_field``.

    Args:
        dataset (TextDataset | InstructionDataset): The dataset.
        config: The job's config (``data.category_field``).

    Returns:
        ``{id: category}``; None when no category field is set or a record lacks it.
    """
    field_name = config.data.category_field
    records = dataset.records
    if not field_name or not records or any(field_name not in r for r in records):
        return None
    return dict(zip(dataset.ids, (r[field_name] for r in records)))
