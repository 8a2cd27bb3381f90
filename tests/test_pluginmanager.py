"""The plugin manager: entry-point loading, blocking, conflicts and the exact messages users see."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable

import pluggy
import pytest

import robench
from robench.discover.manager import (
    DISABLE_ENV,
    TRACE_ENV,
    PluginInfo,
    default_plugin_manager,
    get_plugin_manager,
    plugin_infos,
)
from robench.discover.registry import Registries
from robench.errors import PluginConflictError, PluginLoadError, RobenchError

FAKE_GROUP = "robench-test"
BUILTINS = {
    "architectures": "robench.plugins.architectures",
    "cifar": "robench.plugins.cifar",
    "fashion_mnist": "robench.plugins.fashion_mnist",
    "pgd": "robench.plugins.pgd",
    "standard": "robench.plugins.standard",
}
BROKEN_MESSAGE = (
    "robench could not load plugin robench-fake[broken] (robench_fake.broken): "
    "ModuleNotFoundError: No module named 'robench_fake_missing_dependency'"
)


def test_fake_distribution_is_visible_only_in_its_own_group() -> None:
    fake = {ep.name: ep.dist.name for ep in md.entry_points(group=FAKE_GROUP) if ep.dist is not None}
    assert fake == dict.fromkeys(["broken", "dupe", "ok", "typo"], "robench-fake")
    assert not [ep for ep in md.entry_points(group="robench") if ep.value.startswith("robench_fake")]


# -- Load failures ---------------------------------------------------------------------


def test_broken_plugin_stops_loading_with_its_name_and_the_original_error() -> None:
    with pytest.raises(PluginLoadError) as info:
        get_plugin_manager(group=FAKE_GROUP)
    assert str(info.value) == BROKEN_MESSAGE
    assert isinstance(info.value, RobenchError)  # so the CLI prints it without a traceback
    cause = info.value.__cause__
    assert isinstance(cause, ModuleNotFoundError)
    assert cause.name == "robench_fake_missing_dependency"


def loaded(pm: pluggy.PluginManager) -> list[str]:
    """Names of the plugins actually registered (pluggy lists blocked names with ``None``)."""
    return [name for name, plugin in pm.list_name_plugin() if plugin is not None]


def test_blocking_by_name_lets_the_rest_load(fake_pm: Callable[..., pluggy.PluginManager]) -> None:
    pm = fake_pm(disabled=["broken", "dupe", "typo"])
    assert loaded(pm) == ["ok"]
    assert all(pm.is_blocked(name) for name in ("broken", "dupe", "typo"))
    assert plugin_infos(pm)["ok"] == PluginInfo("ok", "robench-fake", "0.1", "robench_fake.ok")


def test_blocked_plugins_are_not_reported_as_loaded(fake_pm: Callable[..., pluggy.PluginManager]) -> None:
    assert set(plugin_infos(fake_pm())) == {"ok"}


def test_blocking_via_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " broken, typo ,,dupe")
    pm = get_plugin_manager(group=FAKE_GROUP)
    assert loaded(pm) == ["ok"]
    assert pm.is_blocked("typo")
    assert not pm.is_blocked("")


def test_environment_and_argument_blocking_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "broken")
    pm = get_plugin_manager(group=FAKE_GROUP, disabled=["typo", "dupe"])
    assert loaded(pm) == ["ok"]


def test_misspelt_hook_fails_via_check_pending_naming_the_plugin() -> None:
    with pytest.raises(PluginLoadError) as info:
        get_plugin_manager(group=FAKE_GROUP, disabled=["broken", "dupe"])
    message = str(info.value)
    assert message.startswith(
        "robench could not load plugin robench-fake[typo]: unknown hook 'robench_atacks' in plugin "
        "<module 'robench_fake.typo'"
    )
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


def test_duplicate_entry_point_names_across_distributions_conflict() -> None:
    with pytest.raises(PluginConflictError) as info:
        get_plugin_manager(group="robench-test-dupname")
    message = str(info.value)
    assert message.startswith("plugin name 'ok' is provided by both ")
    assert "robench-fake[ok] (robench_fake.ok)" in message
    assert "robench-fake2[ok] (robench_fake.ok)" in message
    assert message.endswith(f"uninstall one of them or block it with {DISABLE_ENV}")


def test_blocking_a_duplicate_entry_point_name_resolves_the_conflict() -> None:
    pm = get_plugin_manager(group="robench-test-dupname", disabled=["ok"])
    assert pm.is_blocked("ok")
    assert loaded(pm) == []


# -- Built-ins -------------------------------------------------------------------------


def test_builtins_load_from_the_robench_group(pm: pluggy.PluginManager) -> None:
    infos = plugin_infos(pm)
    assert set(BUILTINS) <= set(infos)
    for name, module in BUILTINS.items():
        assert infos[name] == PluginInfo(name, "robench", robench.__version__, module)
        assert infos[name].display_name == f"robench[{name}]"
        assert pm.get_plugin(name).__name__ == module
    assert robench.__version__ == md.version("robench")


def test_builtin_can_be_disabled_by_name() -> None:
    attack_plugins = ["pgd", "transfer", "zoo", "corruptions"]  # every plugin that registers attacks
    pm = get_plugin_manager(disabled=attack_plugins)
    assert pm.get_plugin("pgd") is None
    assert "pgd" not in loaded(pm)
    assert set(BUILTINS) - set(attack_plugins) <= set(loaded(pm))
    assert Registries.collect(pm).attacks.names() == []
    assert "baseline" in Registries.collect(pm).defenses


def test_builtin_can_be_disabled_via_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "standard")
    registries = Registries.collect(get_plugin_manager())
    assert not {"baseline", "advt"} & set(registries.defenses.names())  # other plugins' defenses stay
    assert "pgd" in registries.attacks


def test_each_call_builds_a_fresh_manager_and_the_cli_one_is_cached(pm: pluggy.PluginManager) -> None:
    assert set(BUILTINS) <= set(loaded(pm))
    assert get_plugin_manager() is not pm
    assert default_plugin_manager() is default_plugin_manager()


# -- Tracing ---------------------------------------------------------------------------


def test_trace_hooks_prints_hook_calls_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(TRACE_ENV, "1")
    pm = get_plugin_manager(disabled=["transfer", "zoo", "corruptions"])
    pm.hook.robench_attacks()
    pm.hook.robench_cell_start(cell=None)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "[robench hook] robench_attacks() -> 1 impl(s)",
        "[robench hook] robench_attacks done",
        "[robench hook] robench_cell_start(cell) -> 0 impl(s)",
        "[robench hook] robench_cell_start done",
    ]


def test_no_trace_without_the_environment_variable(
    pm: pluggy.PluginManager, capsys: pytest.CaptureFixture[str]
) -> None:
    pm.hook.robench_attacks()
    assert capsys.readouterr().err == ""
