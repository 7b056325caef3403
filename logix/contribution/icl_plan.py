"""Preparing an in-context pass: ids, tokenized segments, truncated demonstrations and random controls.

:func:`build_plan` tokenizes every segment once (see :mod:`logix.contribution.icl` for the layout
and the truncation rule) and draws each candidate's random control, seeded per candidate by
``(seed, candidate id)`` (:func:`control_rng`) so that a resumed or reordered pass draws the same text.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from logix.config.choices import IclControl
from logix.contribution.lm import Bos, bos_ids, encode, model_max_length
from logix.data.template import PromptTemplate
from logix.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SEPARATOR = "\n\n\n"
ID_SEP = "\x1f"
CHAR_ALPHABET = string.ascii_letters + string.digits + " "


@dataclass
class Plan:
    bos: list[int]
    cand_ids: list[str]
    probe_ids: list[str]
    demo: list[list[int]]  # per candidate: truncated ids(ctx_j) + ids(sep)
    ctrl: list[list[int]] | None  # per candidate: truncated control + ids(sep); None for control "none"
    x: list[list[int]]
    y: list[list[int]]
    max_length: int | None
    budget: int | None


def _ids_of(records: Sequence[Mapping[str, Any]], id_field: str, what: str) -> list[str]:
    present = [isinstance(r, Mapping) and id_field in r for r in records]
    if any(not isinstance(r, Mapping) for r in records):
        bad = present.index(False)
        raise DataError(f"{what} {bad} is a {type(records[bad]).__name__}, not a record (a mapping)")
    if all(present):
        ids = [r[id_field] for r in records]
        for i, v in enumerate(ids):
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise DataError(f"{what} {i}: id {v!r} must be a str or an int")
        ids = [str(v) for v in ids]
    elif any(present):
        raise DataError(f"{what} {present.index(False)} has no {id_field!r} but others do; give every {what} an id "
                        "or none (then ids are content hashes)")
    else:
        ids = [_content_id(r) for r in records]
    for i, v in enumerate(ids):
        if ID_SEP in v:
            raise DataError(f"{what} {i}: id {v!r} contains the reserved character \\x1f; rename it")
    dup = [v for v, n in Counter(ids).items() if n > 1]
    if dup:
        raise DataError(f"{len(dup)} duplicate {what} id(s), e.g. {dup[:3]}; deduplicate the {what}s")
    return ids


def _content_id(record: Mapping[str, Any]) -> str:
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def control_rng(seed: int, cand_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}{ID_SEP}{cand_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def vocabulary(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    size = len(tokenizer)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        size = min(size, int(embeddings.num_embeddings))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = np.array([i for i in range(size) if i not in special], dtype=np.int64)
    if vocab.size == 0:
        raise DataError("the tokenizer has no ordinary tokens to draw a random control from")
    return vocab


def build_plan(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Sequence[Mapping[str, Any]],
    probes: Sequence[Mapping[str, Any]],
    template: PromptTemplate,
    control: IclControl | str,
    seed: int,
    separator: str,
    max_length: int | None,
    bos: Bos,
    id_field: str,
) -> Plan:
    try:
        control = IclControl(control)
    except ValueError:
        raise DataError(f"control must be 'chars', 'tokens' or 'none', got {control!r}") from None
    if not candidates:
        raise DataError("no candidates to score")
    if not probes:
        raise DataError("the assessment set (probes) is empty; build one with assessment_set()")
    cand_ids = _ids_of(candidates, id_field, "candidate")
    probe_ids = _ids_of(probes, id_field, "probe")
    bos_list = bos_ids(tokenizer, bos)
    if max_length is None:
        max_length = model_max_length(model)
    for what, records, ids in (("candidate", candidates, cand_ids), ("probe", probes, probe_ids)):
        for rid, record in zip(ids, records):
            if not template.response(record).strip():
                raise DataError(f"{what} {rid!r} has an empty response ({template.output_field!r}); drop it before scoring")
    x = encode(tokenizer, [template.prompt(p) for p in probes])
    y = encode(tokenizer, [template.response(p) for p in probes])
    texts = [template.prompt(c) + template.response(c) for c in candidates]
    demo = encode(tokenizer, texts)
    sep = encode(tokenizer, [separator])[0]
    for pid, yi in zip(probe_ids, y):
        if not yi:
            raise DataError(f"probe {pid!r}: its response has no tokens; drop it before scoring")
    budget = None
    if max_length is not None:
        longest = max(len(a) + len(b) for a, b in zip(x, y))
        budget = max_length - len(bos_list) - len(sep) - longest
        if budget < 1:
            worst = probe_ids[int(np.argmax([len(a) + len(b) for a, b in zip(x, y)]))]
            raise DataError(f"probe {worst!r} has {longest} tokens, leaving no room for a demonstration within "
                            f"max_length={max_length}; raise max_length or drop long probes")

    def fit(ids: list[int]) -> list[int]:
        if budget is not None and len(ids) > budget:
            ids = ids[len(ids) - budget:]
        return ids + sep

    ctrl: list[list[int]] | None = None
    if control is IclControl.CHARS:
        rand_texts = []
        for cid, text in zip(cand_ids, texts):
            picks = control_rng(seed, cid).integers(0, len(CHAR_ALPHABET), size=len(text))
            rand_texts.append("".join(CHAR_ALPHABET[k] for k in picks))
        ctrl = [fit(ids) for ids in encode(tokenizer, rand_texts)]
    elif control is IclControl.TOKENS:
        vocab = vocabulary(model, tokenizer)
        ctrl = [fit(vocab[control_rng(seed, cid).integers(0, vocab.size, size=len(d))].tolist())
                for cid, d in zip(cand_ids, demo)]
    return Plan(bos_list, cand_ids, probe_ids, [fit(d) for d in demo], ctrl, x, y, max_length, budget)
