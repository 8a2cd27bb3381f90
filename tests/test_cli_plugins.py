"""The plugin-facing CLI: `robench list`, `robench plugins`, --version, plugin commands, unknown names."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator

import click
import pluggy
import pytest
from click.testing import CliRunner
from conftest import Shell

import robench
from robench import cli as cli_module
from robench.cli import cli, main
from robench.discover.manager import get_plugin_manager

VERSION = robench.__version__
BUILTIN_ENTRIES = {
    "defenses": {"baseline": "standard", "advt": "standard"},
    "attacks": {"pgd": "pgd", "fgsm": "pgd"},
    "protocols": {"whitebox-pgd": "protocols", "blackbox-dverge": "protocols", "advft-pgd": "protocols"},
    "datasets": {"fashion-mnist": "fashion_mnist", "cifar10": "cifar", "cifar100": "cifar"},
    "architectures": {
        "cnn8": "architectures",
        "resnet20": "architectures",
        "resnet18": "architectures",
        "vgg16": "architectures",
    },
}
BUILTIN_HOOKS = {
    "architectures": ["robench_architectures"],
    "cifar": ["robench_datasets"],
    "fashion_mnist": ["robench_datasets"],
    "pgd": ["robench_attacks"],
    "protocols": ["robench_protocols"],
    "standard": ["robench_defenses"],
}


def sections(output: str) -> dict[str, list[str]]:
    """`robench list` output as section -> entry lines."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in output.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = line[:-1]
            out[current] = []
        elif line.strip():
            out[current].append(line)
    return out


def invoke(*args: str) -> click.testing.Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[pluggy.PluginManager], None]]:
    """Make the CLI use a given manager instead of the cached real one."""

    def use(pm: pluggy.PluginManager) -> None:
        monkeypatch.setattr(cli_module, "default_plugin_manager", lambda: pm)
        cli_module._plugin_commands.cache_clear()

    yield use
    cli_module._plugin_commands.cache_clear()


# -- Built-ins -------------------------------------------------------------------------


def test_list_shows_every_builtin_with_provider_and_description() -> None:
    listed = sections(invoke("list").output)
    assert list(listed) == ["defenses", "attacks", "protocols", "datasets", "architectures"]
    for kind, entries in BUILTIN_ENTRIES.items():
        lines = {line.split()[0]: line for line in listed[kind]}
        assert set(entries) <= set(lines), f"{kind}: {sorted(lines)}"
        for name, plugin in entries.items():
            pattern = rf"  {re.escape(name)} +robench\[{plugin}\] {re.escape(VERSION)} +\S.{{10,}}"
            assert re.fullmatch(pattern, lines[name]), lines[name]


def test_list_descriptions_are_the_docstring_summaries() -> None:
    from robench.plugins.pgd import PGD

    line = next(line for line in invoke("list", "attacks").output.splitlines() if line.split()[0] == "pgd")
    assert line.endswith(PGD.summary())
    assert PGD.summary() == (PGD.__doc__ or "").strip().splitlines()[0]


def test_list_one_kind_shows_only_that_kind() -> None:
    listed = sections(invoke("list", "attacks").output)
    assert list(listed) == ["attacks"]
    assert {line.split()[0] for line in listed["attacks"]} >= set(BUILTIN_ENTRIES["attacks"])
    assert not set(listed) - {"attacks"}


def test_list_kind_name_describes_one_plugin_with_defaults_and_presets() -> None:
    out = invoke("list", "defenses", "advft").output
    assert out.startswith("defense advft\n\nCompress a trained model")
    assert "  compression: 'none' | 'prune' | 'ptq' | 'qat' = 'none'\n" in out
    assert "  smoke: finetune_epochs=1, train_subset=5000" in out
    assert "  steps: int = 50\n" in invoke("list", "protocols", "whitebox-pgd").output
    result = CliRunner().invoke(cli, ["list", "defenses", "advf"])
    assert result.exit_code != 0 and "Did you mean: advft" in str(result.exception)


def test_list_rejects_an_unknown_kind() -> None:
    result = CliRunner().invoke(cli, ["list", "losses"])
    assert result.exit_code == 2
    assert "'losses' is not one of" in result.output


def test_plugins_prints_json_with_dist_version_and_hooks() -> None:
    plugins = {p["name"]: p for p in json.loads(invoke("plugins").output)}
    assert set(BUILTIN_HOOKS) <= set(plugins)
    for name, hooks in BUILTIN_HOOKS.items():
        assert plugins[name] == {
            "name": name,
            "dist": "robench",
            "version": VERSION,
            "module": f"robench.plugins.{name}",
            "hooks": hooks,
        }


def test_version() -> None:
    assert invoke("--version").output == f"robench, version {VERSION} (plugins: robench {VERSION})\n"


def test_unknown_defense_suggests_the_close_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["robench", "plan", "--defense", "basline"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: unknown defense 'basline'. Did you mean: baseline? Available: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_unknown_attack_through_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["robench", "plan", "--attack", "pdg"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert "error: unknown attack 'pdg'. Did you mean: pgd" in capsys.readouterr().err


# -- A third-party distribution --------------------------------------------------------


def test_third_party_plugin_in_list_plugins_and_commands(world: Callable[[pluggy.PluginManager], None]) -> None:
    world(get_plugin_manager(group="robench-test", disabled=["broken", "dupe", "typo"]))
    (line,) = sections(invoke("list", "attacks").output)["attacks"]
    assert re.fullmatch(r"  noise +robench-fake\[ok\] 0\.1 +Random sign noise of size eps, .*", line)
    plugins = {p["name"]: p for p in json.loads(invoke("plugins").output)}
    assert plugins["ok"] == {
        "name": "ok",
        "dist": "robench-fake",
        "version": "0.1",
        "module": "robench_fake.ok",
        "hooks": ["robench_attacks", "robench_commands"],
    }
    # --help lists built-in commands only: listing plugin ones would import every plugin
    assert "fake-hello" not in invoke("--help").output
    assert invoke("fake-hello").output == "hello from robench-fake\n"


def test_plugin_command_clashing_with_a_builtin_fails(
    world: Callable[[pluggy.PluginManager], None], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Plugin:
        @robench.hookimpl
        def robench_commands(self) -> list[click.Command]:
            return [click.Command("list")]

    pm = get_plugin_manager(group="robench-test-empty")
    pm.register(Plugin(), name="x")
    world(pm)
    for args in (["plugins"], ["fake-hello"]):  # found by `robench plugins` and by any non-built-in name
        monkeypatch.setattr(sys, "argv", ["robench", *args])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2
        assert capsys.readouterr().err == "error: plugin command 'list' clashes with an existing robench command\n"


def test_list_attacks_says_a_corruption_is_used_through_its_protocol(shell: Shell) -> None:
    lines = {line.split()[0]: line for line in sections(invoke("list", "attacks").output)["attacks"]}
    assert "use --protocol" not in lines["pgd"]
    assert "[corruption: use --protocol corruptions] " in lines["corruption"]
    code, printed = shell(["plan", "--attack", "corruption"])  # listed with the attacks, but not one of a radius
    assert code == 2 and "'corruption' is a common corruption, not an attack within a linf radius: evaluate " in printed
    assert "with --protocol corruptions" in printed
