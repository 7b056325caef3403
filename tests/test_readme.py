"""The README's command sequence runs exactly as written, in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(section: str = "## One command on a YAML file") -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(section) + r".*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_block_is_found():
    commands = readme_commands()
    assert len(commands) == 5 and all(c.startswith("logix ") for c in commands)


@pytest.mark.slow
def test_readme_command_sequence_runs_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the paths the README uses, from a fresh folder
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    for command in readme_commands():
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"`{command}` failed:\n{proc.stderr[-3000:]}"
    assert (tmp_path / "logix_runs" / "try1" / "influence.jsonl").exists()
    assert (tmp_path / "logix_runs" / "frozen" / "model" / "stores" / "train").is_dir()


def readme_python(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(re.escape(section) + r".*?```python\n(.*?)```", text, re.S).group(1)


def test_readme_two_line_loop_runs_as_written(tmp_path, monkeypatch):
    """The README's own-loop block, executed as written around a real training loop."""
    import torch
    import torch.nn.functional as F

    import logix

    code = readme_python("## The two-line integration in your own loop")
    added = [line for line in code.splitlines() if "run" in line.split("#")[0] and "import" not in line]
    assert len(added) == 3  # init(model=), with run(...), finalize()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    loader = [{"id": list(range(i, i + 5)), "x": x[i:i + 5], "y": y[i:i + 5]} for i in (0, 5)]
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "loader": loader, "F": F,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    exec(compile(code, "README.md", "exec"), namespace)
    store = namespace["store"]
    assert isinstance(store, logix.Store) and sorted(store.ids) == list(range(10))
    assert (tmp_path / "logix_runs" / "my_project").is_dir()
