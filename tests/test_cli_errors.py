"""A failing plugin through the public command: error rows, the grid goes on, exit 1 naming the cells."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_runner import _ExplodingPlugin

from robench import cli
from robench.discover.manager import get_plugin_manager
from robench.results.storage import RunStore
from robench.testing import TinyPlugin


def test_failed_cells_make_the_command_exit_1_and_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pm = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    pm.register(_ExplodingPlugin(), name="exploding")
    monkeypatch.setattr(cli, "default_plugin_manager", lambda: pm)
    argv = [
        "robench",
        "run",
        "--dataset",
        "tiny",
        "--arch",
        "tinynet",
        "--defense",
        "exploding",
        "--defense",
        "baseline",
        "-D",
        "baseline.epochs=1",
        "-A",
        "steps=2",
        "-A",
        "restarts=1",
        "--eps",
        "0.2",
        "--n-samples",
        "20",
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "1 cell(s) failed:" in err
    assert "tiny/tinynet/exploding/model/pgd[restarts=1,steps=2]/linf/eps=0.2/seed=0: exploding.build: " in err
    assert "RuntimeError: out of cheese" in err
    table = RunStore(tmp_path / "run").read_cells()
    assert sorted(table["status"]) == ["error", "ok"]  # the baseline cell still ran and was stored
