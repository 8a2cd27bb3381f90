"""DVERGE's transfer attacks (mifgsm, mdi2fgsm, sgm) against their definitions and torchattacks."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from robench import Threat
from robench.architecture import Normalize, make_model
from robench.attack import sample_keys
from robench.errors import ConfigError
from robench.plugins._keyed import momentum_step
from robench.plugins.architectures import BasicBlock, ResNet20
from robench.plugins.pgd import PGD
from robench.plugins.transfer import (
    MDI2FGSM,
    MIFGSM,
    SGM,
    InputDiversity,
    residual_blocks,
    resize_pad,
    skip_gradients,
)
from robench.testing import CONFORMANCE_SHAPE, TINY_SHAPE, check_attack, tiny_context, tiny_data, tiny_model
from robench.training import Schedule, train

LINF = Threat("linf", 0.1)


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    return tiny_data(32).batch(torch.arange(32))


def keys_for(n: int, base: int = 0) -> Tensor:
    return sample_keys(base, torch.arange(n))


class CutBlock(BasicBlock):
    """A BasicBlock whose backward pass can be cut on one path (``cut``), forward unchanged."""

    cut = ""

    def forward(self, x: Tensor) -> Tensor:
        res_in = x.detach() if self.cut == "residual" else x
        short_in = x.detach() if self.cut == "shortcut" else x
        out: Tensor = self.relu_out(self.residual(res_in) + self.shortcut(short_in))
        return out


def small_resnet(block: type[BasicBlock] = BasicBlock, seed: int = 0) -> nn.Module:
    """Stem, one width-changing block (conv shortcut), one identity block, linear head."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _small_resnet(block)


def _small_resnet(block: type[BasicBlock]) -> nn.Module:
    net = nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(TINY_SHAPE.channels, 8, 3, padding=1),
            relu=nn.ReLU(),
            block1=block(8, 16, stride=2),
            block2=block(16, 16),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(16, TINY_SHAPE.num_classes),
        )
    )
    return nn.Sequential(Normalize(TINY_SHAPE.mean, TINY_SHAPE.std), net).eval()


def trained(model: nn.Module, tmp: Path) -> nn.Module:
    """``model`` after a few epochs on the tiny data (accurate, so attacks have something to break)."""
    return train(model, tiny_context(tmp), Schedule(epochs=15, batch_size=32, lr=0.2, momentum=0.9))


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    tmp = tmp_path_factory.mktemp("transfer")
    return {"plain": trained(tiny_model().train(), tmp), "residual": trained(small_resnet().train(), tmp)}


def input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


# -- mifgsm ---------------------------------------------------------------------------


def test_mifgsm_without_random_start_equals_torchattacks(batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    ours = MIFGSM(steps=7, step_size=0.25, decay=0.9, random_start=False).perturb(model, x, y, LINF, keys_for(32))
    theirs = torchattacks.MIFGSM(model, eps=0.1, alpha=0.025, steps=7, decay=0.9)(x, y)
    assert torch.equal(ours, theirs)


def test_mifgsm_restarts_are_keyed_random_starts(batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    attack = MIFGSM(steps=2)
    assert attack.n_versions() == 3 and MIFGSM(random_start=False).n_versions() == 1
    first = attack.perturb(model, x, y, LINF, keys_for(32, base=1))
    second = attack.perturb(model, x, y, LINF, keys_for(32, base=2))
    assert not torch.equal(first, second), "each version must start elsewhere"


def test_momentum_step_normalises_per_sample_and_survives_flat_losses() -> None:
    grad = torch.stack([torch.full((1, 2, 2), 4.0), torch.zeros(1, 2, 2)])
    momentum = torch.ones(2, 1, 2, 2)
    out = momentum_step(grad, momentum, decay=0.5)
    assert torch.equal(out[0], torch.full((1, 2, 2), 1.5)), "grad / mean|grad| + 0.5 * momentum"
    assert torch.equal(out[1], torch.full((1, 2, 2), 0.5)), "a zero gradient keeps the momentum, no NaN"


# -- mdi2fgsm -------------------------------------------------------------------------


def test_mdi2fgsm_without_diversity_equals_mifgsm(batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    model = tiny_model()
    keys = keys_for(32)
    plain = MIFGSM(steps=5, random_start=False).perturb(model, x, y, LINF, keys)
    assert torch.equal(MDI2FGSM(steps=5, prob=0.0).perturb(model, x, y, LINF, keys), plain)
    assert not torch.equal(MDI2FGSM(steps=5, prob=1.0).perturb(model, x, y, LINF, keys), plain)


def test_resize_pad_is_the_identity_at_scale_one_offset_zero(batch: tuple[Tensor, Tensor]) -> None:
    x, _ = batch
    assert torch.allclose(resize_pad(x, torch.ones(32, 2), torch.zeros(32, 2)), x, atol=1e-5)


def test_resize_pad_equals_pad_then_resize_back() -> None:
    x = torch.rand(2, 3, 8, 8)
    # the image fills 8 of a 10-pixel canvas, 1 pixel from the top and 2 from the left
    scale, offset = torch.full((2, 2), 0.8), torch.tensor([[0.1, 0.2]] * 2)
    canvas = F.pad(x, [2, 0, 1, 1])
    expected = F.interpolate(canvas, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(resize_pad(x, scale, offset), expected, atol=1e-5)


def test_input_diversity_is_redrawn_every_iteration_and_keyed_per_sample() -> None:
    x = torch.rand(16, 3, 32, 32)
    keys = keys_for(16)
    div = InputDiversity.draw(keys, x, steps=50, prob=0.5, resize_rate=1.125)
    sizes = div.scale * 36  # canvas = ceil(32 * 1.125) = 36
    assert torch.allclose(sizes, sizes.round(), atol=1e-4) and sizes.min() >= 32 and sizes.max() <= 35
    assert float(div.offset.min()) >= 0 and bool((div.offset + div.scale <= 1 + 1e-6).all()), "inside the canvas"
    assert 0.3 < float(div.apply.float().mean()) < 0.7
    assert len({tuple(row.tolist()) for row in torch.cat([div.scale[0], div.offset[0]], dim=1)}) > 1
    first, second = div(x, 0, torch.arange(16)), div(x, 1, torch.arange(16))
    both = div.apply[:, 0] & div.apply[:, 1]
    assert bool(both.any()) and not torch.equal(first[both], second[both]), "iterations draw different transforms"
    assert torch.equal(first[~div.apply[:, 0]], x[~div.apply[:, 0]]), "undrawn samples pass unchanged"
    half = InputDiversity.draw(keys[8:], x[8:], steps=50, prob=0.5, resize_rate=1.125)
    assert torch.equal(half.scale, div.scale[8:]) and torch.equal(half.apply, div.apply[8:])
    assert torch.equal(div(x[8:], 0, torch.arange(8, 16)), first[8:]), "a subset gets its own samples' transforms"


# -- sgm ------------------------------------------------------------------------------


def test_sgm_gradient_is_shortcut_plus_gamma_times_residual(batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    model = nn.Sequential(
        Normalize(TINY_SHAPE.mean, TINY_SHAPE.std), nn.Conv2d(1, 8, 3, padding=1), CutBlock(8, 16, stride=2)
    )
    model.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))).eval()
    block = model[2]
    along = {}
    for kept, cut in (("shortcut", "residual"), ("residual", "shortcut")):  # the gradient along one path
        block.cut = cut
        along[kept] = input_grad(model, x, y)
    block.cut = ""
    with skip_gradients(model, 0.2):
        skipped = input_grad(model, x, y)
    assert torch.allclose(skipped, along["shortcut"] + 0.2 * along["residual"], atol=1e-6)
    assert not block.residual._backward_hooks, "hooks are removed afterwards"
    assert torch.allclose(input_grad(model, x, y), along["shortcut"] + along["residual"], atol=1e-6)


def test_sgm_hooks_are_removed_even_on_error() -> None:
    model = small_resnet()
    with pytest.raises(RuntimeError, match="boom"), skip_gradients(model, 0.2):
        assert all(block.residual._backward_hooks for block in residual_blocks(model))
        raise RuntimeError("boom")
    assert len(residual_blocks(model)) == 2
    assert not any(block.residual._backward_hooks for block in residual_blocks(model))


def test_sgm_rejects_a_network_without_residual_blocks(batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    msg = r"sgm needs a residual network \(e.g. resnet20, resnet18\): Sequential has no residual blocks"
    with pytest.raises(ValueError, match=msg):
        SGM(steps=1).perturb(tiny_model(), x, y, LINF, keys_for(32))


def test_sgm_with_gamma_one_is_pgd(batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    model, keys = small_resnet(), keys_for(32)
    pgd = PGD(steps=3, random_start=False, stop_on_success=False).perturb(model, x, y, LINF, keys)
    assert torch.equal(SGM(steps=3, gamma=1.0).perturb(model, x, y, LINF, keys), pgd)
    assert not torch.equal(SGM(steps=3, gamma=0.2).perturb(model, x, y, LINF, keys), pgd)


# -- conformance and strength ---------------------------------------------------------


@pytest.mark.parametrize("cls", [MIFGSM, MDI2FGSM])
def test_conforms(cls: type[MIFGSM]) -> None:
    check_attack(cls, {"steps": 3})


def test_sgm_conforms_on_a_residual_network() -> None:
    # check_attack's default tiny model has no residual blocks: attack a ResNet-20
    check_attack(SGM, {"steps": 3}, make_model(ResNet20(), CONFORMANCE_SHAPE).eval())


@pytest.mark.parametrize(
    ("attack", "model_name"),
    [
        (MIFGSM(steps=10, restarts=1), "plain"),
        (MDI2FGSM(steps=10), "plain"),
        (SGM(steps=10), "residual"),
    ],
    ids=["mifgsm", "mdi2fgsm", "sgm"],
)
def test_attack_lowers_the_accuracy_of_a_trained_model(
    attack: MIFGSM | SGM, model_name: str, trained_models: dict[str, nn.Module]
) -> None:
    model = trained_models[model_name]
    x, y = tiny_data(64, seed=3).batch(torch.arange(64))
    adv = attack.perturb(model, x, y, Threat("linf", 0.3), keys_for(64))

    def accuracy(xs: Tensor) -> float:
        return float((model(xs).argmax(1) == y).float().mean())

    assert accuracy(x) > 0.8
    assert accuracy(adv) < accuracy(x) - 0.3


def test_bad_parameters_are_rejected_before_compute() -> None:
    for cls, params in [
        (MIFGSM, {"steps": 0}),
        (MIFGSM, {"decay": -1.0}),
        (MDI2FGSM, {"prob": 1.5}),
        (MDI2FGSM, {"resize_rate": 1.0}),
        (SGM, {"gamma": 0.0}),
    ]:
        with pytest.raises(ConfigError, match=next(iter(params))):
            cls.create(params)
