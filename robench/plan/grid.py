"""Expand a :class:`~robench.plan.config.Benchmark` into cells, validating every plugin first.

Planning only: nothing here trains or attacks. Every name and parameter is checked against
the registries, so a typo fails in milliseconds, not after an hour of training.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

from robench.attack import Attack
from robench.cell import Cell, ModelKey
from robench.context import Norm, Threat
from robench.defense import Defense
from robench.discover.registry import Registries
from robench.errors import ConfigError
from robench.plan.config import Benchmark, Exclude
from robench.plugin import PluginSpec
from robench.protocol import CLEAN_SOURCE, Protocol, single_attack


def model_key(defense: Defense, dataset: str, arch: str, spec: PluginSpec, seed: int, preset: str) -> ModelKey:
    """The key of the resolved ``defense`` (from ``spec`` and ``preset``) on ``dataset``/``arch``."""
    network = defense.network(arch)
    return ModelKey(
        dataset,
        arch,
        spec.name,
        defense.canonical(),
        spec.label(),
        seed,
        preset,
        defense.model_revision(),
        network="" if network == arch else network,
    )


def defense_datasets(registries: Registries, defenses: Sequence[PluginSpec]) -> tuple[str, ...]:
    """The dataset a run of ``defenses`` evaluates on when the user names none: the one that
    every defense naming any (:meth:`robench.Defense.datasets_for`) is made for; empty when
    none names any.

    :raises ConfigError: when the defenses name no common dataset, or several
    """
    named = {}
    for spec in defenses:
        found = registries.defenses.get(spec.name).datasets_for(spec.param_dict())
        if found:
            named[spec.label()] = found
    if not named:
        return ()
    common = sorted(set.intersection(*(set(found) for found in named.values())))
    if len(common) == 1:
        return (common[0],)
    made_for = "; ".join(f"{label}: {', '.join(found)}" for label, found in named.items())
    if not common:
        raise ConfigError(f"the defenses' models are made for different datasets ({made_for}): name one with --dataset")
    choices = " or ".join(f"--dataset {name}" for name in common)
    raise ConfigError(f"the defenses' models are made for several datasets ({made_for}): choose with {choices}")


def resolve_defense(registries: Registries, spec: PluginSpec, preset: str, dataset: str) -> Defense:
    """The defense instance for ``spec``: preset values, dataset-specific ones, then the user's."""
    cls = registries.defenses.get(spec.name)
    values: dict[str, Any] = {}
    for key in (preset, f"{preset}:{dataset}"):
        values.update(cls.presets.get(key, {}))
    values.update(spec.param_dict())
    return cls.create(values)


def resolve_attack(registries: Registries, spec: PluginSpec, norm: Norm) -> Attack:
    """The attack instance for ``spec``, checked against the threat norm."""
    cls = registries.attacks.get(spec.name)
    if norm not in cls.norms:
        if cls.norms == frozenset({"corruption"}):  # listed with the attacks, but not an attack of a radius
            raise ConfigError(
                f"{spec.name!r} is a common corruption, not an attack within a {norm} radius: evaluate corruptions "
                "with --protocol corruptions (-P corruptions=[...] -P severities=[...] for a subset)"
            )
        raise ConfigError(f"attack {spec.name!r} supports {', '.join(sorted(cls.norms))}, not {norm}")
    return cls.create(spec.param_dict())


def resolve_protocols(benchmark: Benchmark, registries: Registries) -> list[Protocol]:
    """Every protocol of the benchmark, with each attack it uses validated."""
    settings = {s.name: s.param_dict() for s in benchmark.attack_settings}
    for name in settings:
        if name not in {a.name for a in benchmark.attacks}:  # a scope typo would silently do nothing
            raise ConfigError(f"protocol settings for attack {name!r}, which the benchmark does not list")
    protocols = [single_attack(spec, settings.get(spec.name)) for spec in benchmark.attacks]
    for spec in benchmark.protocols:
        definition = registries.protocols.get(spec.name).create(spec.param_dict())
        protocols.append(definition.resolve(benchmark.preset))
    for protocol in benchmark.inline_protocols:
        if protocol.name in registries.protocols:  # two meanings of one name in ids and results
            raise ConfigError(f"inline protocol {protocol.name!r} has the name of a registered protocol; rename it")
        protocols.append(protocol)
    for protocol in protocols:
        check_protocol(protocol, registries, benchmark)
    return protocols


def check_protocol(protocol: Protocol, registries: Registries, benchmark: Benchmark) -> None:
    """Every attack exists, takes its parameters and supports the norm; every source is declared."""
    names = {s.name for s in protocol.surrogates} | ({CLEAN_SOURCE} if protocol.is_corruption() else set())
    for use in protocol.uses:
        resolve_attack(registries, use.attack, protocol.norm or benchmark.norm)
        if use.source is not None and use.source not in names:
            raise ConfigError(f"protocol {protocol.name!r}: use {use.label()} names an undeclared surrogate")
    for surrogate in protocol.surrogates:
        if surrogate.arch is not None:
            registries.architectures.get(surrogate.arch)
        for dataset in benchmark.datasets:
            resolve_defense(registries, surrogate.defense, benchmark.preset, dataset)


def plan(benchmark: Benchmark, registries: Registries) -> list[Cell]:
    """Every cell of the benchmark, in execution order (grouped by model)."""
    for name in benchmark.archs:
        registries.architectures.get(name)
    protocols = resolve_protocols(benchmark, registries)
    cells = []
    own_networks: set[tuple[str, str, int]] = set()
    for dataset in benchmark.datasets:
        eps_grid = _eps_grid(benchmark, registries, dataset)
        for arch, spec, seed in itertools.product(benchmark.archs, benchmark.defenses, benchmark.seeds):
            defense = resolve_defense(registries, spec, benchmark.preset, dataset)
            key = model_key(defense, dataset, arch, spec, seed, benchmark.preset)
            if key.network:  # its own network, whatever --arch says: one model, not one per architecture
                if (dataset, key.defense_label, seed) in own_networks:
                    continue
                own_networks.add((dataset, key.defense_label, seed))
            for variant, protocol in itertools.product(defense.variant_names(), protocols):
                # a protocol that fixes its threat (corruptions) has one cell per model, at eps 0
                norm, grid = (protocol.norm, (0.0,)) if protocol.norm else (benchmark.norm, eps_grid)
                for eps in grid:
                    cells.append(
                        Cell(
                            key,
                            variant,
                            protocol,
                            norm,
                            eps,
                            benchmark.n_samples,
                            benchmark.sample_seed,
                            benchmark.sample_order,
                        )
                    )
    _check_unique(cells)
    return apply_excludes(cells, benchmark.exclude)


def select_cells(cells: list[Cell], select: str | None) -> list[Cell]:
    """The cells whose id contains ``select``; an error, before anything is written, if none does."""
    if not select:
        return cells
    chosen = [c for c in cells if select in c.id]
    if not chosen:
        raise ConfigError(
            f"-k {select!r} matches none of the {len(cells)} cell(s) of this benchmark; "
            "`robench plan` without -k lists their ids"
        )
    return chosen


def apply_excludes(cells: list[Cell], exclude: tuple[Exclude, ...]) -> list[Cell]:
    """``cells`` without those matching an exclude entry; an entry matching nothing is a typo."""
    for entry in exclude:
        if not any(excludes(entry, cell) for cell in cells):
            shown = ", ".join(f"{key} = {json.dumps(value)}" for key, value in entry)
            raise ConfigError(f"exclude entry {{ {shown} }} matches no cell; `robench plan` lists them")
    kept = [cell for cell in cells if not any(excludes(entry, cell) for entry in exclude)]
    if cells and not kept:
        raise ConfigError("the exclude entries remove every cell of the benchmark")
    return kept


def excludes(entry: Exclude, cell: Cell) -> bool:
    """Whether every key of ``entry`` matches ``cell`` (a partial match, as in tox)."""
    return all(_matches(cell, key, value) for key, value in entry)


def _matches(cell: Cell, key: str, value: Any) -> bool:
    m = cell.model
    if key == "eps":
        return isinstance(value, int | float) and math.isclose(cell.eps, value, rel_tol=1e-9)
    if key == "defense":  # the plugin name, or the label with the user's parameters
        return value in (m.defense, m.defense_label)
    if key == "protocol":  # the name, or for a one-attack protocol its attack's plugin name
        return value in (cell.protocol.name, cell.protocol.name.split("[", 1)[0])
    if key == "attack":
        return value in _single_attack_names(cell.protocol)
    return bool(value == {"dataset": m.dataset, "arch": m.arch, "variant": cell.variant, "seed": m.seed}[key])


def _single_attack_names(protocol: Protocol) -> tuple[str, ...]:
    """Name and label of the attack if ``protocol`` comes from the ``attack`` axis, else nothing."""
    if len(protocol.uses) != 1 or protocol.uses[0].source or protocol.name != protocol.uses[0].attack.label():
        return ()
    return (protocol.uses[0].attack.name, protocol.name)


def _eps_grid(benchmark: Benchmark, registries: Registries, dataset: str) -> tuple[float, ...]:
    if benchmark.eps:
        for eps in benchmark.eps:
            Threat(benchmark.norm, eps)  # validates the range
        return benchmark.eps
    return (registries.datasets.get(dataset).default_eps[benchmark.norm],)


def _check_unique(cells: list[Cell]) -> None:
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.id in seen:
            raise ConfigError(f"the benchmark lists cell {cell.id} twice; remove the duplicate axis value")
        seen[cell.id] = cell
