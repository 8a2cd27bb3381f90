"""Conformance checks for plugin authors (and robench's own built-ins).

Opt in from your tests::

    from robench.testing import check_attack
    def test_conforms():
        check_attack(MyAttack)

Each check runs on tiny CPU models and data in seconds.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import torch
from torch import nn

from robench.architecture import Architecture, Normalize, make_model
from robench.attack import Attack, sample_keys
from robench.context import Context, DataShape, ImageData, Norm, Threat
from robench.dataset import Dataset, Split
from robench.defense import Defense
from robench.execute.modelcheck import ModelChecks, check_model
from robench.training import Schedule
from robench.training import train as fit

hookimpl = pluggy.HookimplMarker("robench")
TINY_SHAPE = DataShape(channels=1, height=12, width=12, num_classes=4, mean=(0.5,), std=(0.25,))


def tiny_model(shape: DataShape = TINY_SHAPE, seed: int = 0) -> nn.Module:
    """A small conv net with normalisation inside, in eval mode, initialised from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(Normalize(shape.mean, shape.std), _tiny_net(shape)).eval()


def _tiny_net(shape: DataShape) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(shape.channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(shape.height // 4),  # deterministic on CUDA, unlike adaptive pooling
        nn.Flatten(),
        nn.Linear(8 * 16, shape.num_classes),
    )


def tiny_data(n: int = 64, shape: DataShape = TINY_SHAPE, seed: int = 0) -> ImageData:
    """Random uint8 images whose label is which quadrant is brightest (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 120, (n, shape.channels, shape.height, shape.width), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, shape.num_classes, (n,), generator=g)
    h, w = shape.height // 2, shape.width // 2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label % 4, 2)
        images[i, :, r * h : (r + 1) * h, c * w : (c + 1) * w] += 120
    return ImageData(images, labels)


def tiny_context(tmp: Path, seed: int = 0, preset: str = "smoke", shape: DataShape = TINY_SHAPE) -> Context:
    """A build context over :func:`tiny_data` and :func:`tiny_model`.

    Its ``get_models`` (the model cache, for defenses that start from another defense's
    model) returns ``{"model": ...}``: a tiny model trained for a few clean epochs, whatever
    defense is asked for.
    """
    train = tiny_data(128, shape, seed)

    def start_models(name: str, params: dict[str, object]) -> dict[str, nn.Module]:
        ctx = Context(train, shape, lambda: tiny_model(shape, seed).train(), torch.device("cpu"), seed, preset, tmp)
        return {"model": fit(ctx.new_model(), ctx, Schedule(epochs=5, batch_size=32, lr=0.05, momentum=0.9))}

    return Context(
        train=train,
        shape=shape,
        new_model=lambda: tiny_model(shape, seed).train(),
        device=torch.device("cpu"),
        seed=seed,
        preset=preset,
        cache_dir=tmp,
        default_eps=0.1,
        get_models=start_models,
    )


# 16x16: torchattacks' L2 Square attack cannot handle some smaller image sides.
CONFORMANCE_SHAPE = DataShape(channels=1, height=16, width=16, num_classes=4, mean=(0.5,), std=(0.25,))
CORRUPTION_SHAPE = DataShape(channels=1, height=28, width=28, num_classes=4, mean=(0.5,), std=(0.25,))


class _Block(nn.Module):
    """A residual block in robench's convention: ``residual`` and ``shortcut`` submodules."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


def tiny_residual_model(shape: DataShape = CONFORMANCE_SHAPE, seed: int = 0) -> nn.Module:
    """A small residual net (for attacks such as SGM that need residual blocks), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(shape.channels, 8, 3, padding=1),
            _Block(8),
            nn.AvgPool2d(shape.height // 4),  # deterministic on CUDA, unlike adaptive pooling
            nn.Flatten(),
            nn.Linear(8 * 16, shape.num_classes),
        )
        return nn.Sequential(Normalize(shape.mean, shape.std), net).eval()


def check_attack(
    cls: type[Attack], params: dict[str, Any] | None = None, model: nn.Module | None = None, device: str = "cpu"
) -> None:
    """Shapes, dtype, eps-ball, [0, 1], per-sample determinism and batch independence.

    Attacks with ``batch_seeded = True`` (wrappers of torchattacks attacks that seed a whole
    batch at once) are checked for determinism given the same batch instead.

    :param model: the model to attack (default: a tiny conv net on 16x16 grey images)
    :param device: where the model and data live
    """
    attack = cls.create(params or {})
    assert attack.n_versions() >= 1
    # corruptions have parameters for real image sizes only (Fashion-MNIST's here); they have no radius
    shape = CORRUPTION_SHAPE if "corruption" in cls.norms else CONFORMANCE_SHAPE
    data = tiny_data(16, shape)
    x, y = (t.to(device) for t in data.batch(torch.arange(16)))
    model = (model if model is not None else tiny_model(shape)).to(device)
    for norm in sorted(cls.norms):
        threat = Threat(norm, {"linf": 0.1, "l2": 0.5}.get(norm, 0.0))
        keys = sample_keys(123, torch.arange(16))
        adv = attack.perturb(model, x, y, threat, keys)
        assert adv.shape == x.shape and adv.dtype == x.dtype, f"{cls.name}: wrong shape or dtype"
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1, f"{cls.name}: output outside [0, 1]"
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert norm == "corruption" or float(size.max()) <= threat.eps + 1e-5, f"{cls.name}: outside the {norm} ball"
        again = attack.perturb(model, x, y, threat, keys)
        assert torch.equal(adv, again), f"{cls.name}: same keys must give the same result"
        if not getattr(cls, "batch_seeded", False):
            half = attack.perturb(model, x[8:], y[8:], threat, keys[8:])
            assert torch.allclose(adv[8:], half, atol=1e-6), f"{cls.name}: result depends on the batch"


def check_defense(cls: type[Defense], params: dict[str, Any] | None = None) -> dict[str, ModelChecks]:
    """Presets resolve; fit returns the declared variants; every variant passes the model
    checks the runner runs before each attack (:func:`robench.execute.modelcheck.check_model`).

    Fails on anything a benchmark would flag or refuse: outputs that are not one finite
    tensor of logits, probability outputs, randomness the variant does not declare,
    vanishing input gradients, batch-dependent predictions. Declared randomness passes.

    :returns: each variant's check results, for further assertions
    """
    for values in cls.presets.values():
        cls.create(dict(values))  # every preset must be valid
    defense = cls.create({**cls.presets.get("smoke", {}), **(params or {})})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = tiny_context(Path(tmp))
        models = defense.fit(ctx)
        assert set(models) == set(defense.variant_names()), f"{cls.name}: fit returned other variants"
        skeletons = defense.skeletons(ctx)
        x, y = ctx.train.batch(torch.arange(32))
        for name, model in models.items():
            skeletons[name].load_state_dict(model.state_dict())
            variant = defense.variant(name, model.eval())
            checks = check_model(variant, x, y, ctx.shape.num_classes)  # raises on a broken contract
            fired = checks.fired(variant.randomized)
            assert not fired, f"{cls.name}/{name}: model checks fired: {checks.describe(variant.randomized)}"
            results[name] = checks
    return results


def check_dataset(cls: type[Dataset]) -> None:
    """Class attributes are consistent (loading needs the real files: see the dataset tests)."""
    shape = cls.shape
    assert len(shape.mean) == len(shape.std) == shape.channels, f"{cls.name}: mean/std per channel"
    assert shape.num_classes >= 2 and all(s > 0 for s in shape.std)
    assert set(cls.default_eps) >= {"linf", "l2"}, f"{cls.name}: default eps for linf and l2"


def check_architecture(cls: type[Architecture]) -> None:
    """Builds for grey 28x28 and colour 32x32 data and returns logits with gradients to the input."""
    for shape in (DataShape(1, 28, 28, 10, (0.5,), (0.5,)), DataShape(3, 32, 32, 100, (0.5,) * 3, (0.5,) * 3)):
        model = make_model(cls.create(), shape).eval()
        x = torch.rand(2, shape.channels, shape.height, shape.width, requires_grad=True)
        out = model(x)
        assert out.shape == (2, shape.num_classes), f"{cls.name}: wrong logits shape for {shape}"
        out.sum().backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0, f"{cls.name}: no gradient reaches the input"


@dataclass(frozen=True, kw_only=True)
class TinyDataset(Dataset):
    """Tiny synthetic dataset (brightest quadrant = label) for fast runner tests."""

    name: ClassVar[str] = "tiny"
    shape: ClassVar[DataShape] = TINY_SHAPE
    default_eps: ClassVar[dict[Norm, float]] = {"linf": 0.3, "l2": 2.0}

    def locate(self) -> str:
        """Always available: generated in memory."""
        return "generated in memory"

    def load(self, split: Split) -> ImageData:
        """256 training or 96 test images."""
        return tiny_data(256, seed=1) if split == "train" else tiny_data(96, seed=2)


@dataclass(frozen=True, kw_only=True)
class TinyArch(Architecture):
    """Tiny conv net for fast runner tests."""

    name: ClassVar[str] = "tinynet"

    def build(self, shape: DataShape) -> nn.Module:
        """A fresh tiny network (normalisation is added by robench)."""
        return _tiny_net(shape)


class TinyPlugin:
    """Registers :class:`TinyDataset` and :class:`TinyArch`: ``pm.register(TinyPlugin(), name="tiny")``."""

    @hookimpl
    def robench_datasets(self) -> list[type[Dataset]]:
        """The tiny dataset."""
        return [TinyDataset]

    @hookimpl
    def robench_architectures(self) -> list[type[Architecture]]:
        """The tiny architecture."""
        return [TinyArch]
