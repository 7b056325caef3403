"""logix.data: templates, datasets, collation, ids, file loading, and the shipped quickstart data."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

from logix.data import (
    IGNORE_INDEX,
    InstructionDataset,
    PadCollator,
    PromptTemplate,
    TextDataset,
    load_jsonl,
    load_tokenizer,
    stable_id,
)
from logix.errors import DataError, LogixError

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
SHIPPED = ("instructions.jsonl", "queries.jsonl", "tokenizer.json")
FAMILIES = {"arithmetic", "reverse", "uppercase", "sort", "capitals", "antonyms"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(DATA / "tokenizer.json"))


@pytest.fixture(scope="module")
def train():
    return load_jsonl(DATA / "instructions.jsonl")


@pytest.fixture(scope="module")
def queries():
    return load_jsonl(DATA / "queries.jsonl")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


RECORD = {"id": "r1", "instruction": "Add the numbers.", "input": "2, 3", "output": "5"}


# --------------------------------------------------------------------------- template, ids


def test_template_with_and_without_input():
    template = PromptTemplate()
    assert template.prompt(RECORD) == "### Instruction:\nAdd the numbers.\n\n### Input: 2, 3\n\n### Response:"
    assert template.prompt({**RECORD, "input": ""}) == "### Instruction:\nAdd the numbers.\n\n### Response:"
    assert template.response(RECORD) == " 5"


def test_template_field_names_and_missing_fields():
    template = PromptTemplate(instruction_field="q", input_field=None, output_field="a")
    assert template.prompt({"q": "Hi {input}?", "a": "yes"}) == "### Instruction:\nHi {input}?\n\n### Response:"
    assert template.response({"q": "Hi", "a": "yes"}) == " yes"
    with pytest.raises(DataError, match="'output'"):
        PromptTemplate().response({"instruction": "x", "input": ""})
    with pytest.raises(DataError, match="'input'"):
        PromptTemplate().prompt({"instruction": "x", "output": "y"})
    with pytest.raises(DataError, match="not a str"):
        PromptTemplate().prompt({"instruction": 3, "input": "", "output": "y"})


def test_stable_id_is_deterministic_and_token_sensitive():
    ids = stable_id([1, 2, 3])
    assert len(ids) == 16 and int(ids, 16) >= 0
    assert stable_id((1, 2, 3)) == ids == stable_id(torch.tensor([1, 2, 3]))
    assert len({ids, stable_id([1, 2, 4]), stable_id([3, 2, 1]), stable_id([1, 2]), stable_id([1, 2, 3, 0])}) == 5
    # a golden value: blake2b (8-byte digest) of the tokens as int64 little-endian, on any machine
    assert ids == hashlib.blake2b(struct.pack("<3q", 1, 2, 3), digest_size=8).hexdigest() == "77ba1ae68d5afbb4"


# --------------------------------------------------------------------------- datasets


def test_labels_mask_exactly_the_prompt(tokenizer):
    dataset = InstructionDataset([RECORD, {**RECORD, "id": "r2", "input": ""}], tokenizer)
    for i in range(2):
        item = dataset[i]
        prompt, response = dataset.texts(i)
        n_prompt = len(encode(tokenizer, prompt))
        expected = encode(tokenizer, prompt) + encode(tokenizer, response) + [tokenizer.eos_token_id]
        assert item["input_ids"] == expected
        assert item["attention_mask"] == [1] * len(expected)
        assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert item["labels"][n_prompt:] == expected[n_prompt:]
        assert item["labels"][-1] == tokenizer.eos_token_id
    everything = InstructionDataset([RECORD], tokenizer, train_on="all")[0]
    assert everything["labels"] == everything["input_ids"]


def test_truncation_keeps_the_prompt_and_cuts_the_response(tokenizer):
    record = {**RECORD, "output": "one two three four five six seven eight nine ten"}
    full = InstructionDataset([record], tokenizer)[0]
    n_prompt = full["labels"].count(IGNORE_INDEX)
    short = InstructionDataset([record], tokenizer, max_length=n_prompt + 2)[0]
    assert short["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert short["labels"] == full["labels"][: n_prompt + 2]
    assert tokenizer.eos_token_id not in short["input_ids"]
    with pytest.raises(DataError, match="max_length"):
        InstructionDataset([record], tokenizer, max_length=n_prompt)
    text = TextDataset([{"text": record["output"]}], tokenizer, max_length=4)[0]
    assert text["input_ids"] == encode(tokenizer, record["output"])[:4] == text["labels"]


def test_text_dataset_appends_eos(tokenizer):
    item = TextDataset([{"id": 7, "text": "hello world"}], tokenizer)[0]
    assert item["id"] == 7
    assert item["input_ids"] == encode(tokenizer, "hello world") + [tokenizer.eos_token_id] == item["labels"]
    with pytest.raises(DataError, match="'body'"):
        TextDataset([{"text": "x"}], tokenizer, text_field="body")


def test_id_policies(tokenizer):
    no_id = {k: v for k, v in RECORD.items() if k != "id"}
    assert InstructionDataset([RECORD], tokenizer).ids == ["r1"]
    hashed = InstructionDataset([RECORD], tokenizer, ids="hash")
    assert hashed[0]["id"] == stable_id(hashed[0]["input_ids"])
    assert InstructionDataset([no_id], tokenizer)[0]["id"] == hashed[0]["id"]
    assert InstructionDataset([{**RECORD, "key": 3}], tokenizer, id_field="key", ids="column")[0]["id"] == 3
    with pytest.raises(DataError, match="'key'"):
        InstructionDataset([RECORD], tokenizer, id_field="key", ids="column")
    with pytest.raises(DataError, match="give every record an id"):
        InstructionDataset([RECORD, no_id], tokenizer)
    with pytest.raises(DataError, match="duplicate"):
        InstructionDataset([RECORD, RECORD], tokenizer)
    with pytest.raises(DataError, match="ids must be"):
        InstructionDataset([RECORD], tokenizer, ids="uuid")


def test_dataset_accessors(tokenizer):
    records = [{**RECORD, "category": "math"}, {**RECORD, "id": "r2", "category": "words"}]
    dataset = InstructionDataset(records, tokenizer)
    assert len(dataset) == 2 and dataset.records == records
    assert dataset.categories() == ["math", "words"]
    assert dataset.texts(1) == (PromptTemplate().prompt(records[1]), " 5")
    with pytest.raises(DataError, match="'family'"):
        dataset.categories("family")
    item = dataset[0]
    item["input_ids"].append(99)
    assert dataset[0]["input_ids"][-1] != 99, "items must be copies"


# --------------------------------------------------------------------------- collator


def test_collator_pads_right_and_left():
    items = [
        {"id": "a", "input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "extra": 1},
        {"id": "b", "input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = PadCollator(pad_token_id=0)(items)
    assert set(batch) == {"id", "input_ids", "attention_mask", "labels"}
    assert batch["id"] == ["a", "b"]
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = PadCollator(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)(items)
    assert left["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]


def test_collator_without_ids_or_labels_and_errors():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [1, 2]}, {"input_ids": torch.tensor([3])}])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(DataError, match="empty"):
        PadCollator(0)([])
    with pytest.raises(DataError, match="'id'"):
        PadCollator(0)([{"id": 1, "input_ids": [1]}, {"input_ids": [2]}])
    with pytest.raises(DataError, match="padding_side"):
        PadCollator(0, padding_side="middle")


def test_collator_batches_a_dataset(tokenizer, train):
    dataset = InstructionDataset(train[:8], tokenizer, max_length=64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=PadCollator(tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["id"] == [r["id"] for r in train[:4]]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(dataset[i]["input_ids"]) for i in range(4)]


# --------------------------------------------------------------------------- files


def test_load_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON") as info:
        load_jsonl(path)
    assert isinstance(info.value, (LogixError, ValueError))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_jsonl(path)
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert load_jsonl(str(path)) == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_load_tokenizer_files_and_directories(tmp_path, tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    with pytest.raises(DataError, match="no such tokenizer file"):
        load_tokenizer(str(tmp_path / "nope.json"))
    tokenizer.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.pad_token_id == 0 and encode(again, "Paris") == encode(tokenizer, "Paris")
    (tmp_path / "other.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel",
                                                     "vocab": {"a": 0}, "unk_token": "a"}}))
    with pytest.raises(DataError, match="endoftext"):
        load_tokenizer(str(tmp_path / "other.json"))


# --------------------------------------------------------------------------- shipped data


def test_shipped_files_are_small_and_balanced(train, queries):
    assert sum((DATA / name).stat().st_size for name in SHIPPED) < 600_000
    train_counts = collections.Counter(r["category"] for r in train)
    assert set(train_counts) == FAMILIES and set(train_counts.values()) == {500}
    assert collections.Counter(r["category"] for r in queries) == {f: 10 for f in FAMILIES}
    for record in train:
        assert set(record) == {"id", "category", "instruction", "input", "output"}
        family, number = record["id"].rsplit("-", 1)
        assert family == record["category"] and len(number) == 5 and number.isdigit()
    assert all(r["id"].startswith(f"q-{r['category']}-") for r in queries)


def test_queries_are_held_out(train, queries):
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert len({r["id"] for r in train + queries}) == len(train) + len(queries)
    assert len({key(r) for r in train}) == len(train)
    assert not {key(r) for r in queries} & {key(r) for r in train}


def test_families_vary_their_wording(train):
    wordings = collections.defaultdict(set)
    for record in train:
        wordings[record["category"]].add(record["instruction"].split()[0])
    assert all(len(firsts) >= 3 for firsts in wordings.values()), wordings


def test_shipped_tokenizer_covers_every_text(tokenizer, train, queries):
    template = PromptTemplate()
    texts = [template.prompt(r) + template.response(r) for r in train + queries]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.decode(ids) == text for ids, text in zip(encoded, texts))
    assert tokenizer.unk_token_id is None or all(tokenizer.unk_token_id not in ids for ids in encoded)
    lengths = [len(item["input_ids"]) for item in InstructionDataset(train + queries, tokenizer, max_length=64)]
    assert max(lengths) < 64  # nothing truncated: every example (with its eos) fits


def test_generator_reproduces_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_instructions", DATA / "make_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
