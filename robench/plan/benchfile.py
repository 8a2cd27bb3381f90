"""Benchmark files: a whole grid in one TOML file (``benchmarks/*.toml``), read into a Benchmark.

``benchmarks/README.md`` documents the format with an annotated example. This module checks
the file's shape (known keys, value types) and its ``requires`` list; plugin names and
parameters are validated by :func:`robench.plan.grid.plan`, exactly as for command-line flags.
Every error names the file.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import operator
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from robench.errors import ConfigError
from robench.plan.config import Benchmark, exclude_entry
from robench.plan.execution import execution_from_table
from robench.plugin import PluginSpec
from robench.protocol import SETTINGS, Protocol, protocol_from_dict

TOP_KEYS = (
    "name",
    "preset",
    "requires",
    "norm",
    "grid",
    "evaluation",
    "execution",
    "defenses",
    "attacks",
    "protocols",
)
GRID_KEYS = ("dataset", "arch", "defense", "protocol", "attack", "eps", "seed", "exclude")
EVALUATION_KEYS = ("n_samples", "sample_seed", "batch_size", "shard_size", "sample_order")
INLINE_PROTOCOL_KEYS = ("uses", "surrogates", *SETTINGS)
USE_KEYS = ("attack", "params", "source")
SURROGATE_KEYS = ("name", "defense", "params", "seeds", "arch")

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)")
_CLAUSE = re.compile(r"(>=|<=|==|>|<)\s*(\d+(?:\.\d+)*)")


def load_benchmark(path: Path) -> Benchmark:
    """Read the benchmark file at ``path``; its name defaults to the file's stem.

    :raises ConfigError: the file is missing, is not TOML, has unknown keys or ill-typed
        values, or lists ``requires`` that are not installed
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"benchmark file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return _benchmark(data, path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def benchmark_for_command(
    path: Path,
    grid_flags: Sequence[str],
    batch_size: int | None = None,
    exhaustive: bool = False,
    shard_size: int | None = None,
) -> Benchmark:
    """The benchmark of ``path`` for ``robench run FILE`` / ``robench plan FILE``.

    :param grid_flags: command-line flags given that define the grid: refused, the file does
    :param batch_size: ``--batch-size`` if given (it overrides the file's)
    :param shard_size: ``--shard-size`` if given (it overrides the file's)
    """
    if grid_flags:
        raise ConfigError(
            f"{', '.join(grid_flags)} cannot be combined with a benchmark file ({path}): the file defines the grid, "
            "so edit it instead (--batch-size, --shard-size, --device, --out, --cache-dir, --exhaustive and -k "
            "still apply)"
        )
    benchmark = replace(load_benchmark(path), exhaustive=exhaustive)
    if batch_size is not None:
        benchmark = replace(benchmark, batch_size=batch_size)
    return benchmark if shard_size is None else replace(benchmark, shard_size=shard_size)


def _benchmark(data: dict[str, Any], stem: str) -> Benchmark:
    _check_keys(data, TOP_KEYS, "top-level key")
    check_requires(_strings(data.get("requires", []), "requires"))  # before anything that may need them
    grid, evaluation = _table(data, "grid"), _table(data, "evaluation")
    _check_keys(grid, GRID_KEYS, "[grid] axis")
    _check_keys(evaluation, EVALUATION_KEYS, "[evaluation] key")
    values: dict[str, Any] = {"name": _name(_scalar(data, "name", str, stem))}
    values.update({key: _scalar(data, key, str, None) for key in ("preset", "norm") if key in data})
    kinds = {"sample_order": str}  # the others are integers
    values.update({key: _scalar(evaluation, key, kinds.get(key, int), None, "[evaluation]") for key in evaluation})
    for axis, field in (("dataset", "datasets"), ("arch", "archs")):
        if axis in grid:
            values[field] = tuple(_strings(grid[axis], f"grid.{axis}"))
    if "eps" in grid:
        values["eps"] = tuple(float(v) for v in _items(grid["eps"], "grid.eps", (int, float), "numbers"))
    if "seed" in grid:
        values["seeds"] = tuple(_items(grid["seed"], "grid.seed", (int,), "integers"))
    values["exclude"] = tuple(
        _exclude(item) for item in _items(grid.get("exclude", []), "grid.exclude", (dict,), "tables")
    )
    values.update(_plugins(data, grid))
    values["execution"] = execution_from_table(_table(data, "execution"))
    return Benchmark(**values)


def _name(name: str) -> str:
    # The name becomes part of the run folder's name: keep it one plain path component.
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.strip(".") == "":
        raise ConfigError(f"name {name!r} may only contain letters, digits, '_', '.' and '-'; set `name` in the file")
    return name


def _plugins(data: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """Defenses, attacks and protocols: grid entries merged with their ``[KIND.NAME]`` tables."""
    tables = {kind: _plugin_tables(data, kind) for kind in ("defenses", "attacks", "protocols")}
    defenses = _specs(grid.get("defense", []), tables["defenses"], "grid.defense")
    attacks = _specs(grid.get("attack", []), tables["attacks"], "grid.attack")
    names = _strings(grid.get("protocol", []), "grid.protocol")
    _check_listed(tables["defenses"], [s.name for s in defenses], "defenses", "defense")
    _check_listed(tables["attacks"], [s.name for s in attacks], "attacks", "attack")
    # [protocols.NAME] of a grid.attack entry: the settings (eot, votes) of its one-attack protocol
    single = {n: t for n, t in tables["protocols"].items() if n not in names and n in {s.name for s in attacks}}
    _check_listed({n: t for n, t in tables["protocols"].items() if n not in single}, names, "protocols", "protocol")
    inline = {n: t for n, t in tables["protocols"].items() if "uses" in t}
    return {
        "defenses": defenses,
        "attacks": attacks,
        "protocols": tuple(PluginSpec.of(n, tables["protocols"].get(n)) for n in names if n not in inline),
        "inline_protocols": tuple(_inline_protocol(n, inline[n]) for n in names if n in inline),
        "attack_settings": tuple(_attack_settings(n, t) for n, t in single.items()),
    }


def _attack_settings(name: str, table: dict[str, Any]) -> PluginSpec:
    where = f"[protocols.{name}] (the one-attack protocol of grid.attack {name!r})"
    _check_keys(table, SETTINGS, f"{where} key")
    for key in table:
        _scalar(table, key, int, None, where)
    return PluginSpec.of(name, table)


def _specs(value: Any, shared: Mapping[str, dict[str, Any]], where: str) -> tuple[PluginSpec, ...]:
    """Axis entries: a name, or a table with ``name`` whose other keys override ``[KIND.NAME]``."""
    specs = []
    for item in _items(value, where, (str, dict), "names or tables"):
        own = {"name": item} if isinstance(item, str) else dict(item)
        name = own.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{where}: the table {item!r} needs a `name` string")
        specs.append(PluginSpec.of(name, {**shared.get(name, {}), **own}))
    return tuple(specs)


def _plugin_tables(data: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    tables = _table(data, kind)
    for name, params in tables.items():
        if not isinstance(params, dict):
            raise ConfigError(f"[{kind}] holds one table per plugin ([{kind}.{name}]), got {name} = {params!r}")
    return tables


def _check_listed(tables: Mapping[str, Any], listed: list[str], kind: str, axis: str) -> None:
    # A table for a plugin the grid does not use would silently do nothing: most likely a typo.
    for name in tables:
        if name not in listed:
            close = difflib.get_close_matches(name, listed, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(
                f"[{kind}.{name}] is not used: grid.{axis} does not list {name!r}.{hint} grid.{axis} = {listed}"
            )


def _inline_protocol(name: str, table: dict[str, Any]) -> Protocol:
    where = f"[protocols.{name}]"
    _check_keys(table, INLINE_PROTOCOL_KEYS, f"{where} key")
    uses = _items(table["uses"], f"{where} uses", (dict,), "tables")
    if not uses:
        raise ConfigError(f"{where} uses is empty; a protocol needs at least one attack")
    for use in uses:
        _check_keys(use, USE_KEYS, f"{where} uses key")
        _typed(use, {"attack": str, "params": dict, "source": str}, ("attack",), f"{where} uses")
    surrogates = [
        _surrogate(s, where) for s in _items(table.get("surrogates", []), f"{where} surrogates", (dict,), "tables")
    ]
    for key in SETTINGS:
        _scalar(table, key, int, None, where)
    return protocol_from_dict(name, {**table, "uses": uses, "surrogates": surrogates})


def _surrogate(table: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(table, SURROGATE_KEYS, f"{where} surrogates key")
    _typed(table, {"name": str, "defense": str, "params": dict, "arch": str}, ("name",), f"{where} surrogates")
    if "seeds" not in table:
        return table
    return {**table, "seeds": _items(table["seeds"], f"{where} surrogates seeds", (int,), "integers")}


def _exclude(item: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    entry = exclude_entry(item)  # checks the keys
    for key, value in entry:
        expected: tuple[type, ...] = {"eps": (int, float), "seed": (int,)}.get(key, (str,))
        if not _is(value, expected):
            raise ConfigError(f"grid.exclude: {key} must be {_names(expected)}, got {value!r}")
    return entry


# -- requires: flake8 require-plugins style --------------------------------------------


def check_requires(requires: Iterable[str]) -> None:
    """Fail unless every ``NAME`` / ``NAME>=1.2,<2`` in ``requires`` is installed.

    Versions compare as dotted integers (the leading ``1.2.3`` of ``1.2.3rc1+cpu``);
    operators are ``>=``, ``==``, ``<=``, ``>`` and ``<``.
    """
    expected = list(requires)
    parsed = [(text, *_parse_requirement(text)) for text in expected]
    installed = _robench_distributions()
    missing = []
    for text, name, clauses in parsed:
        dist = _distribution(name)
        if dist is None:
            missing.append(f"{text} (not installed)")
            continue
        version = dist.version
        installed[_normalize(name)] = f"{dist.name}=={version}"
        if not all(_OPERATORS[op](*_padded(_leading_ints(version), wanted)) for op, wanted in clauses):
            missing.append(f"{text} ({version} installed)")
    if missing:
        raise ConfigError(
            "required distributions were not installed!\n"
            f"- installed: {', '.join(sorted(installed.values()))}\n"
            f"- expected: {', '.join(sorted(expected))}\n"
            f"- missing: {', '.join(sorted(missing))}"
        )


def _parse_requirement(text: str) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
    match = _REQUIREMENT.fullmatch(text.strip())
    clauses = [_CLAUSE.fullmatch(c.strip()) for c in match.group(2).split(",")] if match and match.group(2) else []
    if match is None or not all(clauses):
        raise ConfigError(
            f"requires entry {text!r} is not NAME or NAME followed by comma-separated "
            "OP VERSION (OP one of >=, ==, <=, >, <; VERSION dotted integers, e.g. robench>=0.1,<1)"
        )
    return match.group(1), [(c.group(1), _leading_ints(c.group(2))) for c in clauses if c]


def _robench_distributions() -> dict[str, str]:
    """Distributions providing robench plugins, as ``name==version`` (what the user has)."""
    out = {}
    for ep in md.entry_points(group="robench"):
        if ep.dist is not None:
            out[_normalize(ep.dist.name)] = f"{ep.dist.name}=={ep.dist.version}"
    return out


def _distribution(name: str) -> md.Distribution | None:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _leading_ints(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Equal lengths, so that 1.2 == 1.2.0."""
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


# -- shape and type checks ---------------------------------------------------------------


def _check_keys(table: Mapping[str, Any], accepted: tuple[str, ...], what: str) -> None:
    for key in table:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(f"unknown {what} {key!r}.{hint} Accepted: {', '.join(accepted)}")


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table ([{key}]), got {value!r}")
    return value


def _scalar(table: Mapping[str, Any], key: str, kind: type, default: Any, where: str = "") -> Any:
    value = table.get(key, default)
    if key in table and not _is(value, (kind,)):
        raise ConfigError(f"{where + ' ' if where else ''}{key} must be {_names((kind,))}, got {value!r}")
    return value


def _typed(table: Mapping[str, Any], types: Mapping[str, type], required: tuple[str, ...], where: str) -> None:
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}: {table!r} needs {key!r}")
    for key, value in table.items():
        if key in types and not _is(value, (types[key],)):
            raise ConfigError(f"{where}: {key} must be {_names((types[key],))}, got {value!r}")


def _items(value: Any, where: str, kinds: tuple[type, ...], what: str) -> list[Any]:
    """A list whose items are all of ``kinds``; a single item stands for a list of one."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not _is(item, kinds):
            raise ConfigError(f"{where} must be a list of {what}, got {value!r}")
    return items


def _strings(value: Any, where: str) -> list[str]:
    return _items(value, where, (str,), "strings")


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    # TOML booleans are Python ints: never accept them as numbers.
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _names(kinds: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", dict: "a table", bool: "a boolean"}
    if float in kinds:
        kinds = tuple(kind for kind in kinds if kind is not int)  # "a number" covers integers
    return " or ".join(words.get(kind, kind.__name__) for kind in kinds)
