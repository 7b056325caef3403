"""Reading records and tokenizers from disk (or, for tokenizers, from the hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logix.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPECIAL_TOKEN = "<|endoftext|>"
"""The token a standalone ``tokenizer.json`` must hold; used as its bos, eos and pad token."""


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file: one JSON object per line, blank lines skipped.

    Args:
        path: The file to read (UTF-8).

    Returns:
        The records, in file order.

    Raises:
        DataError: The file is missing or unreadable, or a line is not a JSON object;
            the message names the file and the 1-based line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it: {e}") from e
    return [_parse_line(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
    return record


def load_tokenizer(path_or_name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a ``tokenizer.json`` file, a local directory or a hub name.

    * A path ending in ``.json`` is a standalone `tokenizers` file: it is wrapped in a
      ``PreTrainedTokenizerFast`` whose bos, eos and pad token are ``<|endoftext|>``,
      which the file must contain.
    * Anything else (a directory saved with ``save_pretrained`` or a hub name) goes to
      ``AutoTokenizer.from_pretrained``; its pad token is set to its eos token when missing.

    Relative paths are taken as given, relative to the working directory.

    Args:
        path_or_name: The ``.json`` file, directory or hub name.

    Returns:
        The tokenizer, with a pad token whenever it has an eos token.

    Raises:
        DataError: The file is missing or lacks ``<|endoftext|>``, or the tokenizer
            cannot be loaded.
    """
    if path_or_name.endswith(".json"):
        tokenizer = _from_json_file(Path(path_or_name))
    else:
        tokenizer = _from_pretrained(path_or_name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_json_file(path: Path) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exception subclasses
        raise DataError(f"{path}: not a tokenizers JSON file: {e}") from e
    if backend.token_to_id(SPECIAL_TOKEN) is None:
        raise DataError(f"{path}: the tokenizer has no {SPECIAL_TOKEN!r} token to use as bos/eos/pad")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def _from_pretrained(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {name!r}: {e}") from e
