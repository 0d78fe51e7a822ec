"""The README's configuration examples are valid opus configuration (STYLE: docs are tested)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from opus.orchestrator.config import parse_config
from opus.orchestrator.lifecycle import Stage

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```toml\n(.*?)```", README, re.S)


def test_the_readme_has_toml_examples() -> None:
    assert len(BLOCKS) >= 8  # the full reference and one block per agent kind


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0] for b in BLOCKS])
def test_each_toml_example_is_a_valid_config(block: str, tmp_path: Path) -> None:
    data = tomllib.loads(block)
    data.setdefault("repos", {"app": {"path": "../app"}})
    config = parse_config(data, tmp_path / "opus.toml")
    for stage, section in data.get("agents", {}).items():
        assert config.agents.for_stage(Stage(stage)).kind == section["kind"]
