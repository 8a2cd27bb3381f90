"""Meta-tests over robench.hookspecs (datasette style): names, docs, annotations, README coverage."""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
import pytest

from robench import hookspecs

README = Path(__file__).resolve().parents[1] / "README.md"
HOOKS: dict[str, Callable[..., Any]] = {
    name: func
    for name, func in vars(hookspecs).items()
    if inspect.isfunction(func) and func.__module__ == hookspecs.__name__ and not name.startswith("_")
}
REGISTRATION = sorted(name for name, func in HOOKS.items() if not inspect.signature(func).parameters)
SESSION = sorted(set(HOOKS) - set(REGISTRATION))


def type_checking_namespace() -> dict[str, Any]:
    """hookspecs' globals plus what its ``if TYPE_CHECKING:`` block imports, to resolve annotations."""
    namespace = dict(vars(hookspecs))
    tree = ast.parse(inspect.getsource(hookspecs))
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), hookspecs.__file__, "exec"), namespace)
    return namespace


def test_hook_list_is_what_the_plugin_manager_sees(pm: pluggy.PluginManager) -> None:
    assert len(HOOKS) >= 10
    assert sorted(HOOKS) == sorted(hookspecs.__all__)
    specced = {name for name in dir(pm.hook) if not name.startswith("_")}
    assert specced == set(HOOKS)
    assert REGISTRATION == [
        "robench_architectures",
        "robench_attacks",
        "robench_commands",
        "robench_datasets",
        "robench_defenses",
        "robench_protocols",
    ]


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_prefixed_documented_and_annotated(name: str) -> None:
    func = HOOKS[name]
    assert name.startswith("robench_")
    assert hookspecs.hookspec.project_name == "robench"
    assert hasattr(func, "robench_spec"), f"{name} lacks @hookspec"
    assert inspect.getdoc(func), f"{name} has no docstring"
    signature = inspect.signature(func)
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    for param in signature.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) is not annotated"
    # Annotations must also resolve to real types (no stale names under TYPE_CHECKING).
    hints = typing.get_type_hints(func, globalns=type_checking_namespace())
    assert set(hints) == {*signature.parameters, "return"}


@pytest.mark.parametrize("name", REGISTRATION)
def test_registration_hook_has_an_example(name: str) -> None:
    doc = inspect.getdoc(HOOKS[name]) or ""
    assert "Example::" in doc
    assert f"@robench.hookimpl\n    def {name}():" in doc


@pytest.mark.parametrize("name", SESSION)
def test_session_hook_documents_every_argument_and_returns_none(name: str) -> None:
    func = HOOKS[name]
    doc = inspect.getdoc(func) or ""
    for param in inspect.signature(func).parameters:
        assert f":param {param}:" in doc, f"{name} does not document {param}"
    assert typing.get_type_hints(func, globalns=type_checking_namespace())["return"] is type(None)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_documented_in_readme_with_its_exact_arguments(name: str) -> None:
    call = f"{name}({', '.join(inspect.signature(HOOKS[name]).parameters)})"
    assert call in README.read_text(encoding="utf-8"), f"README.md does not mention {call}"
