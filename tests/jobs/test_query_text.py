"""``logix query DIR --text``: new texts scored against a project's rows with the project's model.

The model is rebuilt from ``job.yaml`` with the weights ``logix run`` saved (``final_model.safetensors``)
or, for an extract project, as it was built; the scores equal ``logix.score`` with that model in
Python (itself checked against the logged-query path in tests/integrations/test_score.py); other
weights are refused, naming the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

import logix
from logix.cli import main
from logix.data import PadCollator, TextDataset
from logix.jobs.attribution import load_job_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.limit_train=48", "data.limit_queries=4", "train.epochs=1", "schedule.batch_size=16"]
TEXTS = ["Translate to French: the cat", "What is 2 + 2?"]


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("command", ["run", "extract"])
def test_query_text_equals_score_with_the_projects_model(tmp_path, capsys, command):
    argv = [command, str(ROOT / "configs" / "quickstart.yaml"), f"root={tmp_path}", *SMALL, "--project", "p", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    project = tmp_path / "p"
    assert (project / "final_model.safetensors").exists() == (command == "run")
    capsys.readouterr()
    assert main(["query", str(project), *[a for t in TEXTS for a in ("--text", t)], "--top-k", "4", "--opponents"]) == 0
    records = _records(capsys)
    assert [r["query_text"] for r in records] == TEXTS and all(len(r["proponents"]) == 4 for r in records)

    model, tokenizer, config = load_job_model(project)
    items = TextDataset([{"id": f"text-{i}", "text": t} for i, t in enumerate(TEXTS)], tokenizer, config.data.max_length)
    run_dir = next(p for p in project.iterdir() if (p / "run.json").exists())
    want = logix.score(run_dir, [items[i] for i in range(len(items))], model=model,
                       collator=PadCollator(tokenizer.pad_token_id), top_k=4)
    for q, record in enumerate(records):
        assert [h["id"] for h in record["proponents"]] == want.top_ids[q]
        assert [h["id"] for h in record["opponents"]] == want.bottom_ids[q]
        torch.testing.assert_close(torch.tensor([h["score"] for h in record["proponents"]], dtype=torch.float64),
                                   want.top_scores[q].double(), rtol=1e-5, atol=1e-6)

    # weights of another model state: refused with the cause, exit 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_model(model, str(tmp_path / "other.safetensors"))
    assert main(["query", str(project), "--text", TEXTS[0], "--model", str(tmp_path / "other.safetensors")]) == 1
    assert "another state of the model" in capsys.readouterr().err


def test_query_text_and_damping_errors_are_one_line(tmp_path, capsys):
    run = logix.init("bare", root=tmp_path, config={"store": {"dtype": "float32"}})
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    run.watch(model)
    with run(data_id=[0, 1]):
        model(torch.randn(2, 3)).sum().backward()
    run.finalize()
    assert main(["query", str(tmp_path / "bare"), "--text", "hello"]) == 1  # a logix.init run: no job.yaml
    assert "no job.yaml" in capsys.readouterr().err
    assert main(["influence", str(tmp_path / "bare"), "--absolute-damping"]) == 1
    assert "--absolute-damping needs a value" in capsys.readouterr().err
