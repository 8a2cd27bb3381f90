"""Conformance of every registered plugin (timm-style: parametrised over the registries).

A new built-in is covered with no new test code; third parties get the same checks from
``robench.testing``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.testing import (
    check_architecture,
    check_attack,
    check_dataset,
    check_defense,
    tiny_model,
    tiny_residual_model,
)

REGISTRIES = Registries.collect(get_plugin_manager())

# Fast parameters so conformance runs in seconds; the defaults are exercised by the runner tests.
FAST_DEFENSE_PARAMS: dict[str, dict[str, object]] = {
    "advft": {"finetune_epochs": 1, "attack_steps": 2},
    # 95 % of the tiny model is a handful of weights: its gradients vanish (rightly flagged)
    "card": {"epochs": 1, "rounds": 1, "sparsity": 0.5},
}
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
# Loads released weights files for 3x32x32 data, which no tiny context has: tests/test_robustbench.py
# checks it on files it writes, through the runner (model checks included).
NEEDS_WEIGHTS = {"robustbench"}
# its teacher is a `trades` build of its own dynamic space, which only the runner's model cache
# builds (tiny_context's get_models gives a tiny model whatever is asked): tests/test_proard.py
# runs it through the runner, whose model checks run on every student
NEEDS_CACHE = {"proard"}
NEEDS_FILE = {"checkpoint"}  # no default path: tests/test_checkpoint.py covers its other formats


@pytest.mark.parametrize("name", REGISTRIES.attacks.names())
def test_attack_conforms(name: str) -> None:
    model = tiny_residual_model() if name in NEEDS_RESIDUAL else None
    check_attack(REGISTRIES.attacks.get(name), FAST_ATTACK_PARAMS.get(name), model)


@pytest.mark.parametrize("name", [n for n in REGISTRIES.defenses.names() if n not in NEEDS_WEIGHTS | NEEDS_CACHE])
def test_defense_conforms(name: str, tmp_path: Path) -> None:
    params = FAST_DEFENSE_PARAMS.get(name, {"epochs": 1})
    if name in NEEDS_FILE:  # loads a model rather than training one: the weights of the model check_defense builds
        path = tmp_path / "tiny.pt"
        torch.save(tiny_model().state_dict(), path)
        params = {"path": str(path)}
    check_defense(REGISTRIES.defenses.get(name), params)


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
