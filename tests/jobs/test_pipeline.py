"""The job pipeline: pretrained loading code (offline, from a saved folder), extraction, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import logix
from logix.data import load_tokenizer
from logix.jobs.attribution import AttributionJob

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def job_config(tmp_path, **model) -> dict:
    return {
        "root": str(tmp_path / "runs"),
        "model": {"tokenizer": str(DATA / "tokenizer.json"), **model},
        "data": {"train": str(DATA / "instructions.jsonl"), "queries": str(DATA / "queries.jsonl"),
                 "limit_train": 20, "limit_queries": 4, "max_length": 64},
        "projection": {"rank_in": 4, "rank_out": 4},
        "schedule": {"batch_size": 8},
    }


def saved_model(tmp_path, vocab: int) -> Path:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=vocab))
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder)
    return folder


def test_pretrained_model_from_a_folder_is_loaded_and_extracted(tmp_path):
    tokenizer = load_tokenizer(str(DATA / "tokenizer.json"))
    folder = saved_model(tmp_path, len(tokenizer))
    job = AttributionJob(job_config(tmp_path, name=str(folder)), project="pre", progress=False)
    result = job.run(extract_only=True)
    assert result.checkpoints == ["model"] and result.influence is None
    store = logix.load_run_store(tmp_path / "runs" / "pre" / "model")
    queries = logix.load_run_store(tmp_path / "runs" / "pre" / "model", "queries")
    assert store.n_rows == 20 and queries.n_rows == 4
    assert store.ids[:2] == ["capitals-00314", "sort-00038"]
    loaded = GPT2LMHeadModel.from_pretrained(folder)
    assert store.modules == [n for n, m in loaded.named_modules()
                             if type(m).__name__ in ("Conv1D", "Embedding", "Linear")]
    # job.yaml is the resolved config: loading it gives the same config
    assert logix.Config.from_yaml(tmp_path / "runs" / "pre" / "job.yaml") == job.config


def test_tokenizer_larger_than_the_model_vocabulary_is_a_clear_error(tmp_path):
    folder = saved_model(tmp_path, 100)
    with pytest.raises(logix.LogixError, match="tokenizer has 2048 tokens.*vocabulary has 100"):
        AttributionJob(job_config(tmp_path, name=str(folder)), project="bad", progress=False).run(extract_only=True)


def test_a_project_with_another_config_is_not_reused(tmp_path):
    cfg = job_config(tmp_path, arch_config={"n_layer": 1, "n_embd": 16, "n_head": 2})
    AttributionJob(cfg, project="p", progress=False).run(extract_only=True)
    cfg["projection"]["rank_in"] = 2
    with pytest.raises(logix.LogixError, match="holds a job with another config"):
        AttributionJob(cfg, project="p", progress=False).run(extract_only=True)
    AttributionJob(cfg, project="p", overwrite=True, progress=False).run(extract_only=True)
