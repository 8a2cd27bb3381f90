"""The tree shows the architecture: contracts at the top, one sub-package per data-flow step,
no import cycles (TYPE_CHECKING imports included), modules of 400 lines or less (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROBENCH = ROOT / "robench"
STEPS = {"plan", "discover", "execute", "results", "cli"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """robench modules imported at module level, TYPE_CHECKING blocks included (not inside
    functions: those are deliberate lazy imports, run after every module has loaded)."""
    found: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If | ast.Try):
            body += node.body + node.orelse + getattr(node, "handlers", [])
        elif isinstance(node, ast.ExceptHandler):
            body += node.body
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("robench.") and not m.startswith("robench.plugins")}


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROBENCH.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from robench.execute import x" names a package; resolve to the module if it is one
        graph[name] = {m for m in _top_level_imports(path) if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycles_not_even_through_type_checking() -> None:
    graph = _graph()
    assert graph.get("robench.execute.session")
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_contract_modules_import_no_step_package() -> None:
    # the plugin contracts sit below every step: a step may use them, never the reverse
    contracts = ["attack", "defense", "dataset", "architecture", "context", "protocol", "plugin", "cell", "errors"]
    graph = _graph()
    for name in contracts:
        steps = {m for m in graph[f"robench.{name}"] if m.split(".")[1] in STEPS}
        assert not steps, f"robench/{name}.py imports {steps}"


@pytest.mark.parametrize(
    "path", sorted([*ROBENCH.rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]), ids=lambda p: str(p.relative_to(ROOT))
)
def test_modules_have_at_most_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400, f"{path.relative_to(ROOT)}: split it by responsibility"
