"""The README documents every setting and every stats key, and its commands match CI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_type_hints

from poolkit import PoolConfig, PoolStats

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_settings_table() -> None:
    for f in dataclasses.fields(PoolConfig):
        assert f"| `{f.name}` |" in README, f.name


def test_every_stats_key_is_documented() -> None:
    for key in get_type_hints(PoolStats):
        assert f"| `{key}` |" in README, key


def test_ci_runs_the_readme_test_command() -> None:
    blocks = README.split("```")
    commands = [b.strip() for b in blocks[1::2]][:2]
    assert "example_apps.fastapi_app" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
