"""The built-in attacks against their definitions and against torchattacks."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from robench import Threat
from robench.attack import sample_keys
from robench.losses import cw_margin
from robench.plugins.pgd import FGSM, PGD
from robench.testing import tiny_data, tiny_model


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_data(32).batch(torch.arange(32))


def test_pgd_without_random_start_equals_torchattacks(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    ours = PGD(steps=7, step_size=0.25, random_start=False, stop_on_success=False).perturb(
        model, x, y, Threat("linf", 0.1), sample_keys(0, torch.arange(32))
    )
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=7, random_start=False)(x, y)
    assert torch.equal(ours, theirs)


def test_pgd_l2_without_random_start_equals_torchattacks(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    ours = PGD(steps=5, step_size=0.2, random_start=False, stop_on_success=False).perturb(
        model, x, y, Threat("l2", 1.0), sample_keys(0, torch.arange(32))
    )
    theirs = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=5, random_start=False)(x, y)
    # torchattacks averages the loss over the batch before normalising each gradient: equal up to rounding
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_fgsm_equals_torchattacks(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    ours = FGSM().perturb(model, x, y, Threat("linf", 0.05), sample_keys(0, torch.arange(32)))
    assert torch.equal(ours, torchattacks.FGSM(model, eps=0.05)(x, y))


def test_random_starts_are_keyed_per_sample_not_per_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    attack = PGD(steps=2)
    keys = sample_keys(99, torch.arange(32))
    full = attack.perturb(model, x, y, Threat("linf", 0.1), keys)
    torch.manual_seed(1234)  # the global generator must not matter
    reversed_order = attack.perturb(model, x.flip(0), y.flip(0), Threat("linf", 0.1), keys.flip(0)).flip(0)
    assert torch.allclose(full, reversed_order, atol=1e-6)
    other = attack.perturb(model, x, y, Threat("linf", 0.1), sample_keys(100, torch.arange(32)))
    assert not torch.equal(full, other), "a different version key must give a different start"


def test_pgd_increases_the_loss_and_beats_fgsm() -> None:
    data = tiny_data(64)
    x, y = data.batch(torch.arange(64))
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):  # make the model accurate, so attacks have something to break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
    model.eval()
    threat = Threat("linf", 0.3)  # quadrant contrast is 120/255: 0.3 can flip it
    keys = sample_keys(0, torch.arange(64))

    def acc(xs: torch.Tensor) -> float:
        return float((model(xs).argmax(1) == y).float().mean())

    def loss(xs: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(model(xs), y).item()

    pgd = PGD(steps=20, stop_on_success=False).perturb(model, x, y, threat, keys)  # loss of the last iterate
    pgd_early = PGD(steps=20).perturb(model, x, y, threat, keys)
    fgsm = FGSM().perturb(model, x, y, threat, keys)
    assert acc(x) > 0.8
    assert loss(pgd) > loss(fgsm) > loss(x)
    assert acc(pgd) <= acc(fgsm) and acc(pgd) < acc(x) - 0.3
    assert acc(pgd_early) <= acc(pgd)


def test_cw_margin_matches_definition() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    # sample 0: margin 3 - 1 = 2 -> -(2 + 0.1); sample 1: margin 0 - 2 = -2 -> clamped to 0
    assert torch.allclose(cw_margin(logits, y, 0.1), torch.tensor([-2.1, 0.0]))


def test_pgd_cw_loss_attacks(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    keys = sample_keys(0, torch.arange(32))
    ce = PGD(steps=5, loss="ce").perturb(model, x, y, Threat("linf", 0.1), keys)
    cw = PGD(steps=5, loss="cw").perturb(model, x, y, Threat("linf", 0.1), keys)
    assert not torch.equal(ce, cw)
    assert float(cw_margin(model(cw), y).mean()) >= float(cw_margin(model(x), y).mean())


def test_bad_parameters_are_rejected_before_compute() -> None:
    from robench.errors import ConfigError

    with pytest.raises(ConfigError, match="steps"):
        PGD.create({"steps": 0})
    with pytest.raises(ConfigError, match="'ce' \\| 'cw'"):
        PGD.create({"loss": "hinge"})


def test_stop_on_success_freezes_samples_at_their_first_adversarial_iterate() -> None:
    data = tiny_data(64)
    x, y = data.batch(torch.arange(64))
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
    model.eval()
    threat, keys = Threat("linf", 0.25), sample_keys(5, torch.arange(64))
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])) if torch.is_grad_enabled() else None)
    early = PGD(steps=20, restarts=1).perturb(model, x, y, threat, keys)
    work_early, calls[:] = sum(calls), []
    full = PGD(steps=20, restarts=1, stop_on_success=False).perturb(model, x, y, threat, keys)
    work_full = sum(calls)
    with torch.no_grad():
        fooled_early = model(early).argmax(1) != y
        fooled_full = model(full).argmax(1) != y
    assert fooled_early.sum() >= fooled_full.sum() > 0  # any fooling iterate counts: never weaker
    assert work_early < work_full  # fooled samples stopped costing gradient passes
    untouched = ~fooled_early  # samples never fooled followed exactly the same trajectory
    assert torch.equal(early[untouched], full[untouched])
