"""Shared fixtures for robench's tests."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import pluggy
import pytest

from robench import cli
from robench.discover.manager import DISABLE_ENV, TRACE_ENV, get_plugin_manager

# -- Plugin host: fresh managers and the fake third-party distribution -----------------
# tests/fake_dist is on pythonpath (pyproject), so importlib.metadata sees robench-fake
# (entry-point groups robench-test and robench-test-dupname) and robench-fake2.

FAKE_GROUP = "robench-test"
FAKE_BAD = ("broken", "dupe", "typo")
"""The robench-test entry points that fail or clash on purpose; block them to load ``ok`` alone."""


@pytest.fixture(autouse=True)
def _clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own ROBENCH_DISABLE_PLUGINS / ROBENCH_TRACE_HOOKS must not leak into tests."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(TRACE_ENV, raising=False)


@pytest.fixture
def pm() -> pluggy.PluginManager:
    """A fresh (uncached) manager for the real ``robench`` group: the built-ins."""
    return get_plugin_manager()


@pytest.fixture
def fake_pm() -> Callable[..., pluggy.PluginManager]:
    """Factory: a fresh manager for ``robench-test`` with the bad fake plugins blocked.

    ``fake_pm(disabled=...)`` replaces the blocked names.
    """

    def make(disabled: Iterable[str] = FAKE_BAD) -> pluggy.PluginManager:
        return get_plugin_manager(group=FAKE_GROUP, disabled=disabled)

    return make


Shell = Callable[[list[str]], tuple[int, str]]


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Shell:
    """The console entry point as the shell runs it: ``shell(args)`` -> (exit code, stdout + stderr)."""

    def invoke(args: list[str]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["robench", *args])
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return invoke
