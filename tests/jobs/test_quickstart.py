"""The offline quickstart (`make demo`): fine-tune, log, score; proponents come from the query's task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import logix
from logix.jobs.attribution import AttributionJob

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_point_at_shipped_files():
    for name in ("quickstart", "ekfac", "lora"):
        job = AttributionJob(ROOT / "configs" / f"{name}.yaml")
        for path in (job.config.data.train, job.config.data.queries, job.config.model.tokenizer):
            assert Path(path).is_absolute() and Path(path).exists(), (name, path)


@pytest.mark.slow
def test_quickstart_proponents_share_the_query_task(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "logix.cli", "run", str(ROOT / "configs" / "quickstart.yaml"),
         f"root={tmp_path}", "--project", "quickstart", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    project = tmp_path / "quickstart"
    sanity = json.loads((project / "sanity.json").read_text())
    # 6 balanced task families: random proponents share the query's family 1/6 of the time
    assert abs(sanity["random"] - 1 / 6) < 1e-9
    assert sanity["same_category"] >= 0.5, sanity
    assert sanity["ratio"] >= 3.0, sanity
    index = json.loads((project / "checkpoints.json").read_text())["checkpoints"]
    assert [c["name"] for c in index] == ["epoch-1", "epoch-2"]
    assert logix.load_run_store(project / "epoch-2").n_rows == 3000
    assert "share the query's category" in done.stdout
