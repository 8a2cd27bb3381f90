"""The torchattacks wrappers (eot-pgd, apgd, square, autoattack) against their definitions."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from robench import Attack, Threat
from robench.architecture import Normalize
from robench.attack import sample_keys
from robench.context import DataShape
from robench.errors import ConfigError
from robench.losses import cross_entropy
from robench.plugins._keyed import KeyedIterative
from robench.plugins.pgd import PGD
from robench.plugins.zoo import APGD, EOTPGD, AutoAttack, Square, batch_seed
from robench.testing import TINY_SHAPE, check_attack, tiny_context, tiny_data, tiny_model
from robench.training import Schedule, train

# 16x16: torchattacks' L2 Square cannot start on robench.testing's 12x12 images
SHAPE16 = DataShape(channels=1, height=16, width=16, num_classes=4, mean=(0.5,), std=(0.25,))
THREATS = {"linf": Threat("linf", 0.05), "l2": Threat("l2", 0.5)}
BATCH_SEEDED = [(APGD, {"steps": 5}), (Square, {"n_queries": 50}), (AutoAttack, {"steps": 5, "n_queries": 50})]


def keys_for(n: int, base: int = 0) -> Tensor:
    return sample_keys(base, torch.arange(n))


def predicted_batch(model: nn.Module, n: int) -> tuple[Tensor, Tensor]:
    """16x16 inputs labelled with the model's own predictions: every sample starts correct."""
    x, _ = tiny_data(n, SHAPE16).batch(torch.arange(n))
    with torch.no_grad():
        return x, model(x).argmax(1)


class Noise(nn.Module):
    """Multiplicative Gaussian noise in every mode, like a randomized defense; counts its calls."""

    calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * (1 + 0.5 * torch.randn_like(x))


def noisy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize(TINY_SHAPE.mean, TINY_SHAPE.std),
        nn.Conv2d(1, 8, 3, padding=1),
        Noise(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 16, TINY_SHAPE.num_classes),
    ).eval()


# -- eot-pgd --------------------------------------------------------------------------


@pytest.mark.parametrize("threat", [Threat("linf", 0.1), Threat("l2", 1.0)], ids=["linf", "l2"])
def test_eot_pgd_with_one_draw_is_pgd(threat: Threat) -> None:
    x, y = tiny_data(32).batch(torch.arange(32))
    model, keys = tiny_model(), keys_for(32)
    for stop in (True, False):
        pgd = PGD(steps=5, restarts=2, stop_on_success=stop).perturb(model, x, y, threat, keys)
        eot = EOTPGD(steps=5, restarts=2, stop_on_success=stop, eot_iter=1).perturb(model, x, y, threat, keys)
        assert torch.equal(eot, pgd)


def test_eot_draws_the_model_eot_iter_times_per_step() -> None:
    x, y = tiny_data(8).batch(torch.arange(8))
    model = noisy_model()
    EOTPGD(steps=3, eot_iter=4).perturb(model, x, y, Threat("linf", 0.1), keys_for(8))
    assert model[2].calls == 12


def test_eot_averaging_lowers_the_gradient_variance_on_a_randomized_model() -> None:
    x, y = tiny_data(8).batch(torch.arange(8))
    model = noisy_model()  # random in eval mode, where attacks run

    def variance(eot_iter: int) -> float:
        attack = KeyedIterative(
            model, norm="linf", eps=0.1, alpha=0.02, steps=1, start=None, loss=cross_entropy, eot_iter=eot_iter
        )
        grads = torch.stack([attack.gradient(x, y, 0, torch.arange(8))[0] / eot_iter for _ in range(8)])
        return float(grads.var(dim=0).mean())

    one, sixteen = variance(1), variance(16)
    assert sixteen < one / 4, f"averaging 16 draws should divide the variance by ~16: {one} -> {sixteen}"


def test_eot_pgd_conforms() -> None:
    check_attack(EOTPGD, {"steps": 2, "eot_iter": 2, "restarts": 2})


# -- batch-seeded wrappers ------------------------------------------------------------


@pytest.mark.parametrize(("cls", "params"), BATCH_SEEDED, ids=[cls.name for cls, _ in BATCH_SEEDED])
def test_batch_seeded_attack_conforms(cls: type[Attack], params: dict[str, int]) -> None:
    """check_attack without batch independence, which batch-seeded attacks give up by design."""
    assert getattr(cls, "batch_seeded", False), "torchattacks seeds these per batch: they must say so"
    attack = cls.create(params)
    assert attack.n_versions() == 1
    model = tiny_model(SHAPE16)
    x, y = predicted_batch(model, 8)
    keys = keys_for(8)
    for norm in sorted(cls.norms):
        threat = THREATS[norm]
        rng = torch.random.get_rng_state()
        adv = attack.perturb(model, x, y, threat, keys)
        assert torch.equal(torch.random.get_rng_state(), rng), f"{cls.name}: the global generator was reseeded"
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= threat.eps + 1e-5, f"{cls.name}: output outside the {norm} ball"
        assert float(size.max()) > 0, f"{cls.name}: nothing was perturbed"
        assert torch.equal(attack.perturb(model, x, y, threat, keys), adv), "same batch, same keys: same result"


def test_the_batch_seed_comes_from_the_keys() -> None:
    model = tiny_model(SHAPE16)
    x, y = predicted_batch(model, 8)
    assert batch_seed(keys_for(8, base=1)) != batch_seed(keys_for(8, base=2))
    assert 0 <= batch_seed(torch.tensor([(1 << 62) - 1])) < 2**31
    attack = APGD(steps=3)
    first = attack.perturb(model, x, y, THREATS["linf"], keys_for(8, base=1))
    second = attack.perturb(model, x, y, THREATS["linf"], keys_for(8, base=2))
    assert not torch.equal(first, second), "another version's keys must give another random start"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_with_ten_steps_equals_torchattacks(norm: str) -> None:
    model = tiny_model(SHAPE16)
    x, y = predicted_batch(model, 8)
    threat, keys = THREATS[norm], keys_for(8)
    ours = AutoAttack(steps=10, n_queries=50).perturb(model, x, y, threat, keys)
    theirs = torchattacks.AutoAttack(
        model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=threat.eps, n_classes=4, seed=batch_seed(keys)
    )
    theirs._autoattack.attacks[-1].n_queries = 50  # torchattacks fixes Square at 5000 queries
    assert torch.equal(ours, theirs(x, y))


def test_square_l2_rejects_images_torchattacks_cannot_tile() -> None:
    x, y = tiny_data(4).batch(torch.arange(4))  # 12x12
    with pytest.raises(ValueError, match="square \\(L2\\) cannot run on 12x12 images"):
        Square(n_queries=5).perturb(tiny_model(), x, y, Threat("l2", 0.5), keys_for(4))


# -- strength and parameters ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    ctx = tiny_context(tmp_path_factory.mktemp("zoo"))
    return train(tiny_model().train(), ctx, Schedule(epochs=15, batch_size=32, lr=0.2, momentum=0.9))


@pytest.mark.parametrize(
    "attack",
    [
        EOTPGD(steps=10, eot_iter=2, restarts=1),
        APGD(steps=10),
        Square(n_queries=100),
        AutoAttack(steps=10, n_queries=100),
    ],
    ids=["eot-pgd", "apgd", "square", "autoattack"],
)
def test_attack_lowers_the_accuracy_of_a_trained_model(attack: Attack, trained_model: nn.Module) -> None:
    x, y = tiny_data(16, seed=3).batch(torch.arange(16))
    adv = attack.perturb(trained_model, x, y, Threat("linf", 0.3), keys_for(16))

    def accuracy(xs: Tensor) -> float:
        return float((trained_model(xs).argmax(1) == y).float().mean())

    assert accuracy(x) > 0.8
    assert accuracy(adv) < accuracy(x) - 0.3


def test_bad_parameters_are_rejected_before_compute() -> None:
    for cls, params in [
        (EOTPGD, {"eot_iter": 0}),
        (APGD, {"rho": 1.5}),
        (APGD, {"restarts": 0}),
        (Square, {"p_init": 0.0}),
        (AutoAttack, {"n_queries": 0}),
    ]:
        with pytest.raises(ConfigError, match=next(iter(params))):
            cls.create(params)
    with pytest.raises(ConfigError, match="'ce' \\| 'dlr'"):
        APGD.create({"loss": "cw"})
