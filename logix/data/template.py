"""Prompt templates and stable example ids."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from logix.errors import DataError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input: {input}\n\n### Response:"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:"


def stable_id(token_ids: Sequence[int]) -> str:
    """A content id for a token sequence, the same in every process and on every machine.

    Args:
        token_ids: The tokens (a list, tuple, array or CPU tensor of integers).

    Returns:
        16 hex characters: the 8-byte BLAKE2b digest of the tokens as int64 little-endian.
    """
    data = np.asarray(token_ids, dtype="<i8").tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def field_of(record: Mapping[str, Any], field: str, what: str = "field") -> Any:
    """``record[field]``, or a :class:`DataError` naming the field, the record and its keys."""
    try:
        return record[field]
    except KeyError:
        raise DataError(f"record {_describe(record)} has no {what} {field!r} (its keys: {sorted(record)})") from None
    except TypeError:
        raise DataError(f"expected a record (a mapping), found {type(record).__name__}") from None


def _describe(record: Mapping[str, Any]) -> str:
    text = repr(dict(record))
    return text if len(text) <= 80 else text[:77] + "..."


def _text(record: Mapping[str, Any], field: str) -> str:
    value = field_of(record, field)
    if not isinstance(value, str):
        raise DataError(f"field {field!r} of record {_describe(record)} is a {type(value).__name__}, not a str")
    return value


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction record becomes a prompt and a response (Alpaca format by default).

    The prompt is ``prompt_with_input`` formatted with the record's instruction and input,
    or ``prompt_no_input`` when the input is empty (or ``input_field`` is ``None``); the
    response is ``response_prefix`` followed by the output. The templates may use the
    placeholders ``{instruction}`` and ``{input}``; record values are inserted verbatim.

    Attributes:
        instruction_field: The record key of the instruction.
        input_field: The record key of the optional input, or ``None`` for datasets without one.
        output_field: The record key of the expected response.
        prompt_with_input: The prompt when the input is not empty.
        prompt_no_input: The prompt when the input is empty.
        response_prefix: Put before the output (a space, so that the output's first word
            is tokenized as it would be mid-sentence).
    """

    instruction_field: str = "instruction"
    input_field: str | None = "input"
    output_field: str = "output"
    prompt_with_input: str = ALPACA_PROMPT
    prompt_no_input: str = ALPACA_PROMPT_NO_INPUT
    response_prefix: str = " "

    def prompt(self, record: Mapping[str, Any]) -> str:
        """The prompt of a record.

        Raises:
            DataError: The record lacks a field, or a field is not a string.
        """
        instruction = _text(record, self.instruction_field)
        input_ = "" if self.input_field is None else _text(record, self.input_field)
        template = self.prompt_with_input if input_ else self.prompt_no_input
        return template.format(instruction=instruction, input=input_)

    def response(self, record: Mapping[str, Any]) -> str:
        """The response of a record: ``response_prefix + output``.

        Raises:
            DataError: The record lacks the output field, or it is not a string.
        """
        return self.response_prefix + _text(record, self.output_field)
