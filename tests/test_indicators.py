"""Indicators of attack failure (robench/execute/indicators.py): each fires on a model (or an
attack setting) that triggers it, and stays quiet on a model where the attack works."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import robench_traps
import torch
from torch import nn

from robench.context import Threat
from robench.defense import Variant
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.attacktrace import separable_groups, still_moving
from robench.execute.engine import Setup
from robench.execute.gradientpath import skip_gradient_versions
from robench.execute.indicators import CheckSamples, Indicators, measure_indicators
from robench.execute.modelcheck import as_evaluated, check_model
from robench.execute.versions import expand
from robench.plugin import PluginSpec
from robench.protocol import AttackUse, Protocol, Surrogate, single_attack
from robench.testing import CONFORMANCE_SHAPE, tiny_context, tiny_data, tiny_model
from robench.training import Schedule, train

SHAPE = CONFORMANCE_SHAPE
REGISTRIES = Registries.collect(get_plugin_manager())
PGD10 = {"steps": 10, "restarts": 1}


def _trained(seed: int, tmp: Any) -> nn.Module:
    ctx = tiny_context(tmp, seed=seed, shape=SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return train(tiny_model(SHAPE, seed).train(), ctx, Schedule(epochs=8, batch_size=32, lr=0.05, momentum=0.9))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """Two tiny models trained with different seeds: a surrogate and an independent target."""
    return _trained(0, tmp_path_factory.mktemp("s")).eval(), _trained(1, tmp_path_factory.mktemp("t")).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_data(32, SHAPE, seed=5).batch(torch.arange(32))


def _indicators(
    model: nn.Module,
    protocol: Protocol,
    eps: float = 0.1,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: dict[int, torch.Tensor] | None = None,
    surrogate: nn.Module | None = None,
) -> Indicators:
    """The indicators of ``model`` (checked and evaluated as the runner does) under ``protocol``."""
    return _prepared(model, protocol, eps, data, rows, surrogate)()


def _prepared(
    model: nn.Module,
    protocol: Protocol,
    eps: float = 0.1,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: dict[int, torch.Tensor] | None = None,
    surrogate: nn.Module | None = None,
) -> Callable[[], Indicators]:
    """:func:`measure_indicators` of ``model`` under ``protocol``, once the model checks ran."""
    x, y = data if data is not None else _data()
    variant = Variant("model", model.eval())
    checks = check_model(variant, x, y, SHAPE.num_classes)
    versions = skip_gradient_versions(expand(protocol, REGISTRIES, "linf"), REGISTRIES, checks.no_gradient)
    setup = Setup(key="indicators", batch_size=32, device=torch.device("cpu"), exhaustive=False)
    check = CheckSamples(x, y, torch.arange(len(y)))
    evaluated = as_evaluated(variant, checks)
    return functools.partial(
        measure_indicators,
        evaluated,
        versions,
        Threat("linf", eps),
        check,
        setup,
        checks,
        rows or {},
        lambda _: surrogate or model,
    )


class _Band(nn.Module):
    """Predicts class 1 only while the mean pixel is within 0.03 of 0.6, and class 0 elsewhere;
    its gradient always pushes the mean pixel up (the band is read from a detached value), so
    a sign-gradient attack starting at 0.5 walks through the band and out of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(dim=1)
        band = 10.0 * ((s.detach() - 0.6).abs() < 0.03).float()
        return torch.stack([1 - 0.1 * s, band, torch.zeros_like(s), torch.zeros_like(s)], dim=1)


@pytest.mark.parametrize(("stop_on_success", "expected"), [(False, 1.0), (True, 0.0)])
def test_silent_success_fires_when_the_last_iterate_is_returned(stop_on_success: bool, expected: float) -> None:
    # identical images: the path is recorded per sample even when rows cannot be told apart
    x, y = torch.full((8, 1, 16, 16), 0.5), torch.zeros(8, dtype=torch.long)
    params = {**PGD10, "step_size": 1 / 3, "random_start": False, "stop_on_success": stop_on_success}
    found = _indicators(_Band(), single_attack(PluginSpec.of("pgd", params)), eps=0.3, data=(x, y))
    assert found.silent_success == expected
    assert ("silent_success" in found.fired()) == (expected > 0)


def test_incomplete_optimisation_fires_when_steps_are_too_small() -> None:
    model = tiny_model(SHAPE)
    tiny_steps = _indicators(model, single_attack(PluginSpec.of("pgd", {**PGD10, "step_size": 0.001})))
    assert tiny_steps.incomplete_optimization == 1.0 and "incomplete_optimization" in tiny_steps.fired()
    enough = _indicators(model, single_attack(PluginSpec.of("pgd", {"steps": 50, "restarts": 1, "step_size": 0.1})))
    assert enough.incomplete_optimization == 0.0 and enough.fired() == []


def test_incomplete_optimisation_reads_the_running_best_of_the_last_ten_points() -> None:
    assert still_moving([0.0, 1.0, 2.0, 3.0], window=10, move=0.05)
    assert not still_moving([0.0, *[3.0] * 10], window=10, move=0.05)  # converged ten points ago
    assert not still_moving([0.0, 3.0, *[1.0] * 10], window=10, move=0.05)  # a drop is not progress
    assert not still_moving([2.0] * 5, window=10, move=0.05)  # flat: nothing moved


def test_transfer_failure_fires_when_examples_fool_their_surrogate_only(models: tuple[nn.Module, nn.Module]) -> None:
    surrogate, target = models
    use = AttackUse(PluginSpec.of("pgd", PGD10), "s")
    protocol = Protocol("transfer", uses=(use,), surrogates=(Surrogate("s"),))
    (version,) = expand(protocol, REGISTRIES, "linf")
    x, y = _data()
    x_adv = version.attack.perturb(surrogate, x, y, Threat("linf", 0.2), torch.arange(32))
    assert float((surrogate(x_adv).argmax(dim=1) != y).float().mean()) > 0.5  # the attack works on it
    rows = {version.index: x_adv}
    missed = _indicators(target, protocol, eps=0.2, rows=rows, surrogate=surrogate)
    assert missed.transfer_failure > 0.5 and "transfer_failure" in missed.fired()
    assert math.isnan(missed.silent_success) and missed.attack == ""  # no white-box version
    itself = _indicators(surrogate, protocol, eps=0.2, rows=rows, surrogate=surrogate)
    assert itself.transfer_failure == 0.0 and itself.fired() == []


@pytest.mark.parametrize("trap", [robench_traps.OneHot, robench_traps.NoGradSanitise, robench_traps.Rounding])
def test_unavailable_gradients_fire_without_a_gradient_path_or_with_zero_gradients(trap: type[nn.Module]) -> None:
    found = _indicators(trap(tiny_model(SHAPE)), single_attack(PluginSpec.of("pgd", PGD10)))
    assert found.unavailable_gradients is True and "unavailable_gradients" in found.fired()


def test_unavailable_gradients_stay_quiet_on_a_plain_model() -> None:
    assert _indicators(tiny_model(SHAPE), single_attack(PluginSpec.of("pgd", PGD10))).unavailable_gradients is False


def test_unstable_predictions_fire_on_a_randomized_model(models: tuple[nn.Module, nn.Module]) -> None:
    model = models[0]
    torch.manual_seed(0)  # the trap draws its noise from the global generator
    noisy = _indicators(robench_traps.GaussianNoise(model), single_attack(PluginSpec.of("pgd", PGD10)))
    assert noisy.unstable_predictions > 0.1 and "unstable_predictions" in noisy.fired()
    assert _indicators(model, single_attack(PluginSpec.of("pgd", PGD10))).unstable_predictions < 0.1


def test_unconstrained_failure_fires_when_the_attack_cannot_move(models: tuple[nn.Module, nn.Module]) -> None:
    model = models[0]
    pgd = single_attack(PluginSpec.of("pgd", PGD10))
    rounded = _indicators(robench_traps.Rounding(model), pgd)  # zero gradients: PGD stays put
    assert rounded.unconstrained_failure > 0.5 and "unconstrained_failure" in rounded.fired()
    assert _indicators(model, pgd).unconstrained_failure == 0.0


def test_indicators_do_not_move_the_global_generators(models: tuple[nn.Module, nn.Module]) -> None:
    measure = _prepared(robench_traps.GaussianNoise(models[0]), single_attack(PluginSpec.of("pgd", PGD10)))
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    measure()  # the noise trap draws from the global generator
    assert torch.equal(torch.rand(3), expected)


def test_separable_groups_part_near_duplicates_only() -> None:
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.05)])
    assert separable_groups(x, Threat("linf", 0.1)) == [[0, 1], [2], [3]]
    assert separable_groups(x, Threat("linf", 0.01)) == [[0, 1, 3], [2]]


def test_columns_say_ok_or_which_fired_and_na_for_corruption_cells() -> None:
    assert Indicators().summary() == "n/a"
    assert Indicators(attack="pgd#0", unavailable_gradients=False, silent_success=0.0).summary() == "ok"
    fired = Indicators(attack="pgd#0", unavailable_gradients=True, unstable_predictions=0.5, transfer_failure=0.2)
    assert fired.summary() == "unavailable_gradients,unstable_predictions"
    assert set(fired.columns()) >= {"indicators", "indicator_attack", "indicator_seconds", "indicator_silent_success"}
