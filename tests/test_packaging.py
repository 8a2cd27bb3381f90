"""Packaging: every built-in in plugins/ is installed as robench.plugins.X and declared as an entry point."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
ROBENCH = ROOT / "robench"
CORE = ROOT / "robench"


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def builtin_modules() -> list[str]:
    """Every module or package directly in plugins/, except plugins/__init__.py and private
    helper modules (``_name.py``: imported by the built-ins, not plugins themselves)."""
    modules = [p.stem for p in PLUGINS.glob("*.py") if not p.name.startswith("_")]
    return sorted(modules + builtin_packages())


def builtin_packages() -> list[str]:
    return sorted(p.name for p in PLUGINS.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def test_plugins_folder_is_installed_as_robench_plugins() -> None:
    setuptools = pyproject()["tool"]["setuptools"]
    assert "robench.plugins" in setuptools["packages"]
    assert "plugins" not in setuptools["packages"]
    assert setuptools["package-dir"]["robench.plugins"] == "plugins"


def test_there_are_builtins_to_check() -> None:
    assert {"pgd", "standard", "fashion_mnist", "cifar", "architectures"} <= set(builtin_modules())


@pytest.mark.parametrize("name", builtin_modules())
def test_every_builtin_is_an_entry_point(name: str) -> None:
    values = set(pyproject()["project"]["entry-points"]["robench"].values())
    assert f"robench.plugins.{name}" in values, f'add `{name} = "robench.plugins.{name}"` to pyproject'


def test_every_entry_point_names_an_existing_builtin() -> None:
    entry_points = pyproject()["project"]["entry-points"]["robench"]
    assert entry_points, "no built-in entry points"
    for name, value in entry_points.items():
        module, _, attr = value.partition(":")
        assert not attr, f"{name}: entry points name modules, not {value!r}"
        assert module.startswith("robench.plugins."), f"{name}: {value!r} is not under robench.plugins"
        assert module.removeprefix("robench.plugins.") in builtin_modules(), f"{name}: {value!r} does not exist"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"entry-point name {name!r} is not a lowercase identifier"


def test_every_builtin_package_is_listed_in_setuptools_packages() -> None:
    packages = pyproject()["tool"]["setuptools"]["packages"]
    missing = [f"robench.plugins.{name}" for name in builtin_packages() if f"robench.plugins.{name}" not in packages]
    assert not missing, f"add {missing} to [tool.setuptools] packages"


def test_every_robench_subpackage_is_listed_in_setuptools_packages() -> None:
    # a sub-package missing here is absent from the wheel: robench would install, then fail to import
    packages = pyproject()["tool"]["setuptools"]["packages"]
    core = sorted(".".join(init.parent.relative_to(ROBENCH.parent).parts) for init in ROBENCH.rglob("__init__.py"))
    assert core and "robench.execute" in core
    missing = [name for name in core if name not in packages]
    assert not missing, f"add {missing} to [tool.setuptools] packages"


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (``import a.b``, ``from a.b import c`` -> a.b, a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_forbidden(module: str) -> bool:
    return any(module == banned or module.startswith(banned + ".") for banned in ("plugins", "robench.plugins"))


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_the_builtins(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if is_forbidden(m))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; the core reaches built-ins only through entry points"
    text = path.read_text(encoding="utf-8")
    dynamic = re.findall(r"""import_module\(\s*["'](?:robench\.)?plugins\b""", text)
    assert not dynamic, f"{path.relative_to(ROOT)} imports built-ins dynamically"


def test_the_import_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import plugins.pgd\nfrom robench import plugins\nfrom robench.plugins.cifar import X\n")
    assert sorted(m for m in imported_modules(sample) if is_forbidden(m)) == [
        "plugins.pgd",
        "robench.plugins",
        "robench.plugins.cifar",
        "robench.plugins.cifar.X",
    ]
    sample.write_text("import robench.plugin\nfrom robench.discover.manager import x\n")
    assert not [m for m in imported_modules(sample) if is_forbidden(m)]
