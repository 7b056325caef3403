"""Tokenized datasets whose items carry an example id, ready for :class:`PadCollator`.

Both datasets tokenize every record once, when they are built (a fast tokenizer encodes
thousands of short records in well under a second), so that ids (which may hash the
tokens) and lengths are known up front and duplicate ids fail early, not at logging time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from logix.config import IdPolicy, TrainOn
from logix.data.template import PromptTemplate, field_of, stable_id
from logix.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""The label of tokens that carry no loss (prompt tokens, padding)."""

ALPACA = PromptTemplate()
"""The default template (Alpaca); a frozen dataclass, so sharing one instance is safe."""
Item = dict[str, Any]


class _TokenizedDataset(Dataset):
    """Shared storage, id resolution and item access of the datasets below."""

    def __init__(self, records: Sequence[Mapping[str, Any]], id_field: str, ids: IdPolicy | str) -> None:
        self._records = list(records)
        self._id_field = id_field
        self._id_policy = _choice(IdPolicy, ids, "ids")
        self._input_ids: list[list[int]] = []
        self._labels: list[list[int]] = []
        self._ids: list[str | int] = []

    def _finish(self, input_ids: list[list[int]], labels: list[list[int]]) -> None:
        self._input_ids, self._labels = input_ids, labels
        self._ids = self._resolve_ids()

    def _resolve_ids(self) -> list[str | int]:
        present = [self._id_field in r for r in self._records]
        policy = self._id_policy
        if policy is IdPolicy.AUTO and any(present) and not all(present):
            missing = present.index(False)
            raise DataError(f"record {missing} has no {self._id_field!r} but others do; "
                            "give every record an id or pass ids='hash'")
        if policy is IdPolicy.HASH or (policy is IdPolicy.AUTO and not any(present)):
            ids: list[str | int] = [stable_id(t) for t in self._input_ids]
        else:
            ids = [_check_id(field_of(r, self._id_field, "id field"), self._id_field) for r in self._records]
        _check_unique(ids)
        return ids

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Item:
        input_ids = self._input_ids[index]
        return {
            "id": self._ids[index],
            "input_ids": list(input_ids),
            "attention_mask": [1] * len(input_ids),
            "labels": list(self._labels[index]),
        }

    @property
    def records(self) -> list[Mapping[str, Any]]:
        """The raw records, in dataset order."""
        return self._records

    @property
    def ids(self) -> list[str | int]:
        """Every item's id, in dataset order."""
        return list(self._ids)

    def categories(self, field: str = "category") -> list[Any]:
        """Every record's value of ``field`` (for example its task family), in dataset order.

        Raises:
            DataError: A record lacks the field.
        """
        return [field_of(r, field) for r in self._records]


def _choice(enum: type[IdPolicy] | type[TrainOn], value: Any, name: str):
    """``value`` as a member of ``enum`` (its string value or the member itself)."""
    try:
        return enum(value)
    except (ValueError, TypeError):
        choices = [m.value for m in enum]
        raise DataError(f"{name} must be {', '.join(repr(c) for c in choices[:-1])} or {choices[-1]!r}, "
                        f"got {value!r}") from None


def _check_id(value: Any, field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"id field {field!r} holds a {type(value).__name__} ({value!r}); ids must be str or int")
    return value


def _check_unique(ids: Sequence[str | int]) -> None:
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise DataError(f"{len(duplicates)} duplicate example id(s), e.g. {duplicates[:3]}; "
                        "logix keys every logged row by id (deduplicate the records)")


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set tokenizer.eos_token first")
    return int(eos)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")


class InstructionDataset(_TokenizedDataset):
    """Instruction-tuning examples: a prompt, a response and, by default, loss on the response only.

    Item ``i`` is ``{"id", "input_ids", "attention_mask", "labels"}`` (lists of ints),
    where ``input_ids = prompt_tokens + response_tokens + [eos]``. Prompt and response are
    tokenized separately, without special tokens (no bos is added). With
    ``train_on="response"`` the labels are ``-100`` on every prompt token and equal to
    ``input_ids`` elsewhere; with ``"all"`` they equal ``input_ids``.

    Truncation keeps the whole prompt and cuts the response (then the eos) from the end
    so that an example has at most ``max_length`` tokens. A prompt that leaves no room for
    a single response token (``len(prompt) >= max_length``) is an error, not a silent
    prompt truncation: raise ``max_length`` or drop the record.

    Args:
        records: Mappings holding the template's fields (and usually an id).
        tokenizer: A Hugging Face tokenizer with an eos token.
        max_length: The most tokens an example keeps (at least 2).
        template: How a record becomes a prompt and a response.
        train_on: ``"response"`` (mask the prompt) or ``"all"``.
        id_field: The record key of the example id.
        ids: ``"column"`` takes ``record[id_field]`` (a str or int, required), ``"hash"``
            takes :func:`stable_id` of the item's ``input_ids``, ``"auto"`` the column when
            every record has it and the hash when none does.

    Raises:
        DataError: A record lacks a field, a prompt is too long, an option is invalid, or
            two items get the same id.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
        template: PromptTemplate = ALPACA,
        train_on: TrainOn | str = TrainOn.RESPONSE,
        id_field: str = "id",
        ids: IdPolicy | str = IdPolicy.AUTO,
    ) -> None:
        super().__init__(records, id_field, ids)
        train_on = _choice(TrainOn, train_on, "train_on")
        _check_max_length(max_length)
        self.template = template
        self.max_length = max_length
        self.train_on = train_on
        prompts = _encode(tokenizer, [template.prompt(r) for r in self._records])
        responses = _encode(tokenizer, [template.response(r) for r in self._records])
        eos = _eos_id(tokenizer)
        examples = [self._build(i, p, r + [eos]) for i, (p, r) in enumerate(zip(prompts, responses))]
        self._finish([e[0] for e in examples], [e[1] for e in examples])

    def _build(self, index: int, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        if len(prompt) >= self.max_length:
            raise DataError(f"record {index}: its prompt has {len(prompt)} tokens, leaving no room for the "
                            f"response within max_length={self.max_length}; raise max_length or drop it")
        input_ids = (prompt + response)[: self.max_length]
        if self.train_on is TrainOn.ALL:
            return input_ids, list(input_ids)
        return input_ids, [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt):]

    def texts(self, index: int) -> tuple[str, str]:
        """The ``(prompt, response)`` strings of item ``index``, before tokenization and truncation."""
        record = self._records[index]
        return self.template.prompt(record), self.template.response(record)


class TextDataset(_TokenizedDataset):
    """Plain language-modelling text: labels equal ``input_ids``.

    Item ``i`` is ``{"id", "input_ids", "attention_mask", "labels"}`` with
    ``input_ids = text_tokens + [eos]`` (no special tokens otherwise), cut from the end
    to ``max_length`` tokens.

    Args:
        records: Mappings holding ``text_field`` (and usually an id).
        tokenizer: A Hugging Face tokenizer with an eos token.
        max_length: The most tokens an example keeps (at least 2).
        text_field: The record key of the text.
        id_field: The record key of the example id.
        ids: ``"column"``, ``"hash"`` or ``"auto"``, as for :class:`InstructionDataset`.

    Raises:
        DataError: A record lacks the text, an option is invalid, or two items get the same id.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
        text_field: str = "text",
        id_field: str = "id",
        ids: IdPolicy | str = IdPolicy.AUTO,
    ) -> None:
        super().__init__(records, id_field, ids)
        _check_max_length(max_length)
        self.max_length = max_length
        self.text_field = text_field
        eos = _eos_id(tokenizer)
        tokens = [(t + [eos])[:max_length] for t in _encode(tokenizer, self._texts())]
        self._finish(tokens, [list(t) for t in tokens])

    def _texts(self) -> list[str]:
        texts = [field_of(r, self.text_field) for r in self._records]
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"record {index}: field {self.text_field!r} is a {type(text).__name__}, not a str")
        return texts

    def text(self, index: int) -> str:
        """The text of item ``index``, before tokenization and truncation."""
        return self._records[index][self.text_field]
