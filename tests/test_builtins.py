"""Conformance of every registered plugin (timm-style: parametrised over the registries).

A new built-in is covered with no new test code; third parties get the same checks from
``robench.testing``.
"""

from __future__ import annotations

import pytest

from robench.pluginmanager import get_plugin_manager
from robench.registry import Registries
from robench.testing import check_architecture, check_attack, check_dataset, check_defense, tiny_residual_model

REGISTRIES = Registries.collect(get_plugin_manager())

# Fast parameters so conformance runs in seconds; the defaults are exercised by the runner tests.
FAST_DEFENSE_PARAMS: dict[str, dict[str, object]] = {"advft": {"finetune_epochs": 1, "attack_steps": 2}}
FAST_ATTACK_PARAMS: dict[str, dict[str, object]] = {
    "pgd": {"steps": 3},
    "mifgsm": {"steps": 3},
    "mdi2fgsm": {"steps": 3},
    "sgm": {"steps": 3},
    "eot-pgd": {"steps": 2, "eot_iter": 2},
    "apgd": {"steps": 5},
    "square": {"n_queries": 50},
    "autoattack": {"steps": 5, "n_queries": 50},
}
NEEDS_RESIDUAL = {"sgm"}


@pytest.mark.parametrize("name", REGISTRIES.attacks.names())
def test_attack_conforms(name: str) -> None:
    model = tiny_residual_model() if name in NEEDS_RESIDUAL else None
    check_attack(REGISTRIES.attacks.get(name), FAST_ATTACK_PARAMS.get(name), model)


@pytest.mark.parametrize("name", REGISTRIES.defenses.names())
def test_defense_conforms(name: str) -> None:
    check_defense(REGISTRIES.defenses.get(name), FAST_DEFENSE_PARAMS.get(name, {"epochs": 1}))


@pytest.mark.parametrize("name", REGISTRIES.datasets.names())
def test_dataset_conforms(name: str) -> None:
    check_dataset(REGISTRIES.datasets.get(name))


@pytest.mark.parametrize("name", REGISTRIES.architectures.names())
def test_architecture_conforms(name: str) -> None:
    check_architecture(REGISTRIES.architectures.get(name))


def test_every_plugin_has_a_summary() -> None:
    for registry in (REGISTRIES.attacks, REGISTRIES.defenses, REGISTRIES.datasets, REGISTRIES.architectures):
        for name, entry in registry:
            assert entry.cls.summary(), f"{registry.kind} {name} has no docstring summary"
