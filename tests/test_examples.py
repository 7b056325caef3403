"""Every example runs end to end (as a user would run it) and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("config", ["logix.yaml", "ekfac_pca.yaml"])
def test_log_gpt2_example(tmp_path, config):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "log_gpt2.py"), "--examples", "32",
         "--config", str(ROOT / "configs" / config), "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "rows          : 32 in 1 shard(s), dtype int8" in out  # store.dtype: the default, int8
    assert "lm_head" in out and "transformer.h.1.mlp.c_proj" in out


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` as a user would and return what it printed.

    One intra-op thread: these models are tiny, and two OpenMP threads on a busy 2-core machine
    (other tests, benchmarks) spin-wait and run ~20x slower than one.
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=600, check=True, cwd=ROOT, env=env,
    ).stdout


def same_category_share(out: str) -> tuple[float, float]:
    match = re.search(r"same-category share of the top-5 proponents.*?: ([\d.]+)% \(random: ([\d.]+)%\)", out)
    assert match, out
    return float(match.group(1)), float(match.group(2))


def proponent_blocks(out: str) -> list[list[str]]:
    """Per printed query, its proponent lines (score, [category], text)."""
    blocks = []
    for line in out.splitlines():
        if line.startswith("query "):
            blocks.append([])
        elif blocks and re.match(r"^  [+-]\d\.\d{3}e[+-]\d+  \[", line):
            blocks[-1].append(line)
    return blocks


@pytest.mark.slow
def test_torch_loop_influence_example(tmp_path):
    out = run_example("torch_loop_influence.py", "--train", "300", "--root", str(tmp_path))
    assert "logged 300 training rows" in out and "and 60 queries" in out
    blocks = proponent_blocks(out)
    assert len(blocks) == 3 and all(len(b) == 5 for b in blocks)
    assert "query q-capitals-0 [capitals]: Which city is the capital of Austria? -> Vienna" in out
    share, random = same_category_share(out)
    assert random == pytest.approx(16.7, abs=1.0)
    assert share > 2 * random, out  # proponents come from the query's task family far above chance
    assert (tmp_path / "torch_loop" / "stores" / "queries").is_dir()


@pytest.mark.slow
def test_trainer_callback_example(tmp_path):
    out = run_example("trainer_callback.py", "--train", "240", "--queries", "12", "--root", str(tmp_path))
    assert "schedule:\n    epochs:\n    - 1\n    - 2" in out
    assert "checkpoints.json (2 entries" in out
    lines = re.findall(r"^  (epoch-\d)\s+step\s+(\d+)\s+epoch ([\d.]+)\s+lr ([\d.e+-]+)\s+weight ([\d.]+)", out, re.M)
    assert [name for name, *_ in lines] == ["epoch-1", "epoch-2"]
    steps, lrs, weights = [int(s) for _, s, *_ in lines], [float(x[3]) for x in lines], [float(x[4]) for x in lines]
    assert steps == [15, 30]  # 240 examples / batch 16 = 15 steps per epoch
    assert lrs[0] > lrs[1] > 0  # linear decay: the first epoch weighs more
    assert sum(weights) == pytest.approx(1.0, abs=2e-3)
    blocks = proponent_blocks(out)
    assert len(blocks) == 3 and all(len(b) == 5 for b in blocks)
    share, random = same_category_share(out)
    assert random == pytest.approx(16.7, abs=3.0)
    assert share > 1.5 * random, out
    assert (tmp_path / "trainer" / "epoch-2" / "stores" / "queries").is_dir()


@pytest.mark.slow
def test_lora_influence_example(tmp_path):
    out = run_example("lora_influence.py", "--train", "240", "--base", "240", "--queries", "12",
                      "--root", str(tmp_path))
    modules = re.findall(r"^  (base_model\.\S+)\s+(\d+) x (\d+)$", out, re.M)
    assert len(modules) == 8, out  # lora_A and lora_B of c_attn and c_fc, in 2 layers
    assert all(".lora_A." in name or ".lora_B." in name for name, *_ in modules)
    # int8 rows (the default): one byte per value plus one float32 scale per module (8 modules)
    assert "bytes per example: 544 (512 int8 values); 240 training rows" in out
    blocks = proponent_blocks(out)
    assert len(blocks) == 3 and all(len(b) == 5 for b in blocks)
    share, random = same_category_share(out)
    assert random == pytest.approx(16.7, abs=3.0)
    assert share > 1.5 * random, out
    outliers = out.split("highest self-influence")[1].splitlines()[1:4]
    values = [float(line.split()[0]) for line in outliers]
    assert len(values) == 3 and values == sorted(values, reverse=True), out
    median = float(re.search(r"training examples: ([\d.e+-]+)\)", out).group(1))
    assert values[-1] > median


def test_every_shipped_config_loads():
    import logix

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(logix.Config.from_yaml(path), logix.Config)


def test_configuration_docs_are_in_sync():
    from logix.config import config_reference

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert config_reference().strip() in text, "regenerate docs/configuration.md (see its header)"


@pytest.mark.slow
def test_instruction_selection_example(tmp_path):
    out = run_example("instruction_selection.py", "--out", str(tmp_path / "subset"))
    assert "vs random" in out and "(baseline)" in out
    assert len((tmp_path / "subset" / "selected.jsonl").read_text().splitlines()) == 120
    share = {m.group(1): float(m.group(2)) for m in re.finditer(r"top 10% by (\w+)\s+([\d.]+)% corrupted", out)}
    # planted signal: the pool holds 20 % corrupted records; the in-context score keeps fewer
    assert share["icl"] < 20.0 and share["selector"] < 20.0
    means = re.search(r"mean icl: corrupted ([+-][\d.]+) .*clean ([+-][\d.]+)", out)
    assert means and float(means.group(1)) < float(means.group(2))
