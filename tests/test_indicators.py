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

from robench.context import ImageData, Progress, Threat
from robench.defense import Variant
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.attacktrace import isolated, still_moving
from robench.execute.engine import Setup, evaluate
from robench.execute.gradientpath import skip_gradient_versions
from robench.execute.indicators import CheckSamples, Indicators, measure_indicators, path_recorder
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


def _data() -> ImageData:
    return tiny_data(32, SHAPE, seed=5)


def _indicators(
    model: nn.Module,
    protocol: Protocol,
    eps: float = 0.1,
    data: ImageData | None = None,
    rows: dict[int, torch.Tensor] | None = None,
    surrogate: nn.Module | None = None,
) -> Indicators:
    """The indicators of ``model`` under ``protocol`` on 32 samples, all of them check samples."""
    return _prepared(model, protocol, eps, data, rows, surrogate)()


def _prepared(
    model: nn.Module,
    protocol: Protocol,
    eps: float = 0.1,
    data: ImageData | None = None,
    rows: dict[int, torch.Tensor] | None = None,
    surrogate: nn.Module | None = None,
) -> Callable[[], Indicators]:
    """The cell evaluated as the session does (checks, versions, the attacks with the path
    recorded); :func:`measure_indicators` left to call."""
    data = data if data is not None else _data()
    indices = torch.arange(len(data))
    x, y = data.batch(indices)
    variant = Variant("model", model.eval())
    checks = check_model(variant, x, y, SHAPE.num_classes)
    versions = skip_gradient_versions(expand(protocol, REGISTRIES, "linf"), REGISTRIES, checks.no_gradient)
    setup = Setup(key="indicators", batch_size=32, device=torch.device("cpu"), exhaustive=False, votes=5, eot=10)
    evaluated, threat, check = as_evaluated(variant, checks), Threat("linf", eps), CheckSamples(x, y, indices)
    recorder = path_recorder(versions, threat, check, data, indices, setup.batch_size)
    transfer = rows or {}
    out = evaluate(
        evaluated,
        versions,
        threat,
        data,
        indices,
        setup=setup,
        transfer=lambda v: transfer[v.index],
        progress=Progress(),
        recorder=recorder,
    )
    return functools.partial(
        measure_indicators,
        evaluated,
        versions,
        threat,
        check,
        setup,
        checks,
        out,
        recorder,
        transfer,
        lambda _: surrogate,
    )


def _band_data() -> ImageData:
    """Grey images of mean pixel 0.5, each with one pixel at 0.8 and one at 0.2 in its own
    places: more than twice eps 0.1 apart from each other, so each one's path is told apart."""
    images = torch.full((8, 1, 16, 16), 128, dtype=torch.uint8)
    for i in range(8):
        images[i].view(-1)[i] = 204
        images[i].view(-1)[255 - i] = 51
    return ImageData(images, torch.zeros(8, dtype=torch.long))


class _Band(nn.Module):
    """Predicts class 1 only while the mean pixel is within 0.01 of 0.542, and class 0 elsewhere;
    its gradient always pushes the mean pixel up (the band is read from a detached value), so
    a sign-gradient attack from 0.502 in steps of 0.04 lands in the band once and walks out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(dim=1)
        band = 10.0 * ((s.detach() - 0.542).abs() < 0.01).float()
        return torch.stack([1 - 0.1 * s, band, torch.zeros_like(s), torch.zeros_like(s)], dim=1)


@pytest.mark.parametrize(("stop_on_success", "expected"), [(False, 1.0), (True, 0.0)])
def test_silent_success_fires_when_the_last_iterate_is_returned(stop_on_success: bool, expected: float) -> None:
    params = {**PGD10, "step_size": 0.4, "random_start": False, "stop_on_success": stop_on_success}
    found = _indicators(_Band(), single_attack(PluginSpec.of("pgd", params)), eps=0.1, data=_band_data())
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
    x, y = _data().batch(torch.arange(32))
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


def test_the_recorded_path_changes_no_result_and_follows_each_sample_until_fooled() -> None:
    model, data = tiny_model(SHAPE), _data()
    indices = torch.arange(32)
    x, y = data.batch(indices)
    versions = expand(single_attack(PluginSpec.of("pgd", PGD10)), REGISTRIES, "linf")
    setup = Setup(key="path", batch_size=32, device=torch.device("cpu"), exhaustive=False)
    threat, check = Threat("linf", 0.1), CheckSamples(x, y, indices)
    recorder = path_recorder(versions, threat, check, data, indices, 32)
    assert recorder is not None and bool(recorder.usable.all())
    variant = Variant("model", model)
    run = functools.partial(evaluate, variant, versions, threat, data, indices, setup=setup, transfer=lambda v: x)
    watched, plain = run(progress=Progress(), recorder=recorder), run(progress=Progress())
    assert torch.equal(watched.versions[0], plain.versions[0]) and torch.equal(watched.robust, plain.robust)
    fooled = (watched.clean & ~watched.versions[0]).tolist()
    assert 0 < sum(fooled) < sum(watched.clean.tolist())  # some samples leave the batch early, some stay
    for i, hit in enumerate(fooled):
        if not watched.clean[i]:
            assert recorder.path.losses[i] == []  # never attacked
            continue
        # stop on success: queried at each iterate until one fools it, then frozen
        first = recorder.path.fooled[i].index(True) if hit else 10
        assert len(recorder.path.losses[i]) == min(first + 1, 10)


def test_near_duplicate_samples_have_no_readable_path() -> None:
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    images[1], images[3] = 255, 13  # 13/255 = 0.05 from sample 0 and sample 2 (a duplicate of 0)
    data, indices = ImageData(images, torch.zeros(4, dtype=torch.long)), torch.arange(4)
    clean = data.batch(indices[:2])[0]
    assert isolated(clean, data, indices, Threat("linf", 0.1), 2).tolist() == [False, True]
    assert isolated(clean, data, indices, Threat("linf", 0.01), 3).tolist() == [False, True]  # 0 and 2 are equal


def test_columns_say_ok_or_which_fired_and_na_for_corruption_cells() -> None:
    assert Indicators().summary() == "n/a"
    assert Indicators(attack="pgd#0", unavailable_gradients=False, silent_success=0.0).summary() == "ok"
    fired = Indicators(attack="pgd#0", unavailable_gradients=True, unstable_predictions=0.5, transfer_failure=0.2)
    assert fired.summary() == "unavailable_gradients,unstable_predictions"
    assert set(fired.columns()) >= {"indicators", "indicator_attack", "indicator_seconds", "indicator_silent_success"}
