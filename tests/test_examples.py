"""Every example runs end to end (as a user would run it) and prints what it promises."""

from __future__ import annotations

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
    assert "rows          : 32 in 1 shard(s), dtype float32" in out
    assert "lm_head" in out and "transformer.h.1.mlp.c_proj" in out


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
