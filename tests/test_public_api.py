"""The public API is complete and visible: built-in plugins import nothing else, every public
name is documented, and importing robench does not import torch (fast --help)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import robench

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def _robench_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of robench or one of its modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, m) for line, m in found if m == "robench" or m.startswith("robench.")]


@pytest.mark.parametrize("path", sorted(PLUGINS.rglob("*.py")), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_builtin_plugins_import_only_the_public_api(path: Path) -> None:
    # robench itself (its __all__), or a sibling built-in (robench.plugins.*): nothing internal
    internal = [
        (line, m) for line, m in _robench_imports(path) if m != "robench" and not m.startswith("robench.plugins")
    ]
    assert not internal, f"{path.name} imports robench internals: {internal}; export what it needs from robench"


def test_the_walk_sees_internal_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import robench\nfrom robench.execute.session import Session\n\n\ndef f():\n    import robench.plan.grid\n"
    )
    assert _robench_imports(bad) == [(1, "robench"), (2, "robench.execute.session"), (6, "robench.plan.grid")]


@pytest.mark.parametrize("name", robench.__all__)
def test_every_public_name_resolves_and_classes_and_functions_are_documented(name: str) -> None:
    value = getattr(robench, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert inspect.getdoc(value), f"robench.{name} has no docstring"


def test_dir_lists_the_public_names() -> None:
    assert set(robench.__all__) <= set(dir(robench))
    with pytest.raises(AttributeError, match="no attribute 'sessoin'"):
        robench.sessoin  # noqa: B018


def test_importing_robench_and_planning_does_not_import_torch() -> None:
    code = (
        "import sys, robench, robench.cli.flags, robench.plan.config, robench.plan.benchfile\n"
        "robench.ConfigError, robench.Benchmark, robench.PluginSpec\n"
        "print(sorted(m for m in ('torch', 'torchattacks', 'pandas', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
