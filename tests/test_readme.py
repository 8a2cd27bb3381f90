"""The README's quick start stays true: CI runs exactly its second command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert commands[0].endswith("robench run --defense baseline --attack pgd")


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line for line in ROOT.joinpath(".ci/run").read_text().splitlines() if line and line[0] not in "#cs"]
    assert ci_lines == [quick_start_commands()[1]]
