"""The advft defense: notation, validation, int8 execution, honest gradients, runner rows."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantize

import robench
from robench.context import Context, ImageData, Threat
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.plugins.advft import AdverFine
from robench.plugins.advft.quant import ENGINE, CpuOnly, calibrate, fake_quantized, to_int8
from robench.plugins.pgd import PGD
from robench.results.storage import RunStore
from robench.testing import TinyPlugin, tiny_context, tiny_data
from robench.training import Schedule, train

FAST = {"finetune_epochs": 1, "attack_steps": 2, "calibration_size": 64}


def trained_tiny(tmp: Path) -> nn.Module:
    """A tiny model that has learnt the tiny task (brightest quadrant = label)."""
    ctx = tiny_context(tmp)
    return train(ctx.new_model(), ctx, Schedule(epochs=30, batch_size=32, lr=0.05, momentum=0.9))


def context(tmp: Path, parent: nn.Module) -> Context:
    """A tiny build context whose model cache holds ``parent`` for every start defense."""
    return dataclasses.replace(tiny_context(tmp), get_models=lambda name, params: {"model": copy.deepcopy(parent)})


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    return trained_tiny(tmp_path_factory.mktemp("parent"))


# -- parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({}, "f_std+AFT"),
        ({"finetune": "none"}, "f_std"),
        ({"compression": "prune", "finetune": "standard"}, "P(f_std)+SFT"),
        ({"compression": "ptq", "finetune": "none"}, "Q(f_std)"),
        ({"start": "advt", "compression": "ptq"}, "Q(f_rob)+AFT"),
        ({"start": "scratch", "compression": "qat", "finetune_epochs": 20}, "Q[QAT](f_init)+AFT"),
        ({"compression": "prune", "finetune_epochs": 0}, "P(f_std)"),
    ],
)
def test_variants_are_named_in_the_papers_notation(params: dict[str, object], name: str) -> None:
    assert AdverFine.create(params).variant_names() == (name,)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bits": 4}, "only 8"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"start": "scratch"}, "compression='qat'"),
        ({"compression": "qat", "finetune": "none"}, "trains the model"),
        ({"compression": "zip"}, "compression"),
    ],
)
def test_bad_parameters_fail_before_any_compute(params: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, robench.errors.ConfigError), match=message):
        AdverFine.create(params)


def test_presets_resolve_and_schedules_follow_the_paper() -> None:
    for values in AdverFine.presets.values():
        AdverFine.create(dict(values))
    pruned = AdverFine.create({"compression": "prune"}).schedule()
    quantized = AdverFine.create({"compression": "ptq"}).schedule()
    assert (pruned.lr, pruned.momentum, pruned.epochs) == (0.1, 0.0, 3)
    assert (quantized.lr, quantized.momentum, quantized.epochs) == (0.01, 0.9, 3)


# -- fitting, caching, int8 ---------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "prune", "ptq", "qat"])
def test_fit_compresses_fine_tunes_and_reloads_into_its_skeleton(
    tmp_path: Path, parent: nn.Module, compression: str
) -> None:
    # qat: quantization-aware adversarial training from scratch, as the paper's Table 5 row
    extra = {"start": "scratch", "finetune_epochs": 30, "lr": 0.05} if compression == "qat" else {}
    defense = AdverFine.create({**FAST, "compression": compression, "sparsity": 0.5, **extra})
    ctx = context(tmp_path, parent)
    ((name, model),) = defense.fit(ctx).items()
    skeleton = defense.skeletons(ctx)[name]
    skeleton.load_state_dict(model.state_dict())
    x, y = tiny_data(64, seed=3).batch(torch.arange(64))
    fitted, reloaded = defense.variant(name, model), defense.variant(name, skeleton.eval())
    assert torch.equal(fitted.model(x), reloaded.model(x)), "the cached model must predict the same"
    assert accuracy(fitted.model, x, y) > 0.8, "fine-tuning must keep the task"
    parent_params = sum(p.numel() for p in parent.parameters())
    params = sum(p.numel() for p in fitted.attack_model.parameters())
    assert (params < parent_params) == (compression == "prune")
    quantized = compression in ("ptq", "qat")
    assert (fitted.bits, fitted.grad_model is not None) == ((8, True) if quantized else (32, False))
    if quantized:
        assert isinstance(fitted.model, CpuOnly)
        assert torch.equal(fitted.grad_model(x).argmax(1), fitted.model(x).argmax(1))


def _output_step(twin: nn.Module) -> float:
    """The scale of the twin's last activation quantizer: one step of the int8 logits."""
    return float([m for m in twin.modules() if isinstance(m, FakeQuantize) and m.dtype == torch.quint8][-1].scale)


def test_ptq_model_runs_integer_kernels_and_matches_its_twin(tmp_path: Path, parent: nn.Module) -> None:
    """The deployed kernels (whatever this CPU's ISA) compute the twin's function: logits
    within rounding (two output steps) of each other, the same predictions."""
    x, y = tiny_data(64, seed=3).batch(torch.arange(64))
    twin = calibrate(fake_quantized(parent, x[:2]), tiny_data(128), n=128, seed=0)
    int8 = to_int8(twin)
    assert isinstance(int8, CpuOnly) and not list(int8.parameters())
    assert torch.backends.quantized.engine == ENGINE
    inner = int8.__dict__["inner"]
    kinds = {type(m).__module__ for m in inner.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds), kinds
    weights = [v for v in inner.state_dict().values() if isinstance(v, Tensor) and v.is_quantized]
    weights += [w for m in inner.modules() if hasattr(m, "weight") and callable(m.weight) for w in [m.weight()]]
    assert weights and all(w.dtype in (torch.qint8, torch.quint8) for w in weights)
    with torch.inference_mode():
        gap = (int8(x) - twin(x)).abs().max()
    assert float(gap) <= 2 * _output_step(twin) + 1e-6, "the twin must compute what the integer model computes"
    assert (int8(x).argmax(1) == twin(x).argmax(1)).float().mean() >= 0.98
    assert abs(accuracy(int8, x, y) - accuracy(parent, x, y)) <= 0.05


def test_int8_model_matches_its_twin_at_the_edges_of_the_calibrated_range() -> None:
    """The saturation case. Every weight of the conv quantizes to +127 and the inputs sit at
    the top of the activation range (255), so each pair of products is 2 x 255 x 127 = 64,770:
    kernels that add pairs in saturating int16 (fbgemm/oneDNN on CPUs without VNNI) compute
    something else than the twin there. Inputs past the calibrated maximum must clamp at
    the same value in both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.05)
        model[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    # calibrated on images in [0, 0.5]: a 1.0 pixel lies past the calibrated maximum
    images = torch.randint(0, 128, (64, 1, 12, 12), generator=g, dtype=torch.uint8)
    twin = calibrate(fake_quantized(model, images[:2].float() / 255), ImageData(images, torch.zeros(64).long()), 64, 0)
    int8 = to_int8(twin)
    edges = {
        "top of range": torch.full((8, 1, 12, 12), 127 / 255),
        "bottom of range": torch.zeros(8, 1, 12, 12),
        "past the maximum": torch.ones(8, 1, 12, 12),
        "0/1 checkerboard": (torch.rand(8, 1, 12, 12, generator=g) < 0.5).float(),
    }
    step = _output_step(twin)
    with torch.inference_mode():
        for name, x in edges.items():
            gap = float((int8(x) - twin(x)).abs().max())
            assert gap <= 2 * step + 1e-6, f"{name}: int8 and twin differ by {gap:.3f} (output step {step:.4f})"


class _HardRound(nn.Module):
    """An activation quantizer with rounding's true gradient (zero): the masking trap."""

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.scale, self.zero_point = float(fq.scale), int(fq.zero_point)
        self.qmin, self.qmax = fq.quant_min, fq.quant_max

    def forward(self, x: Tensor) -> Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def test_attacking_through_the_twin_is_honest_where_rounding_gradients_mask(tmp_path: Path, parent: nn.Module) -> None:
    """PGD through the straight-through twin fools the int8 model; PGD through rounding's
    real gradient (zero) barely moves, and would report false robustness."""
    x, y = tiny_data(96, seed=4).batch(torch.arange(96))
    twin = calibrate(fake_quantized(parent, x[:2]), tiny_data(128), n=128, seed=0)
    int8 = to_int8(twin)
    rounding = copy.deepcopy(twin)
    for name, module in list(rounding.named_children()):
        if name.startswith("activation_post_process") and isinstance(module, FakeQuantize):
            setattr(rounding, name, _HardRound(module))
    threat = Threat("linf", 0.3)
    keys = torch.arange(len(y))
    attack = PGD.create({"steps": 10, "random_start": False})
    clean = accuracy(int8, x, y)
    through_twin = accuracy(int8, attack.perturb(twin, x, y, threat, keys), y)
    through_rounding = accuracy(int8, attack.perturb(rounding, x, y, threat, keys), y)
    assert clean > 0.8
    assert through_rounding >= clean - 0.05, "rounding's zero gradient leaves the inputs (nearly) unchanged"
    assert through_twin <= through_rounding - 0.5, (clean, through_twin, through_rounding)


def test_adversarial_fine_tuning_trains_on_pgd_examples(tmp_path: Path, parent: nn.Module) -> None:
    """AFT raises robust accuracy over SFT from the same start model."""
    x, y = tiny_data(96, seed=5).batch(torch.arange(96))
    threat, keys = Threat("linf", 0.2), torch.arange(96)
    attack = PGD.create({"steps": 10})
    robust = {}
    for mode in ("standard", "adversarial"):
        params = {"finetune": mode, "finetune_epochs": 20, "attack_steps": 7, "eps": 0.2, "lr": 0.05}
        (model,) = AdverFine.create(params).fit(context(tmp_path, parent)).values()
        robust[mode] = accuracy(model, attack.perturb(model, x, y, threat, keys), y)
    # measured: standard 0.35, adversarial 0.52 (both 1.0 clean)
    assert robust["adversarial"] > robust["standard"] + 0.1, robust


# -- registration and the runner ----------------------------------------------------


def test_runner_rows_carry_the_compression(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    assert Registries.collect(pm).defenses.get("advft") is AdverFine
    defenses = tuple(
        PluginSpec.of("advft", {**FAST, "compression": c, "sparsity": 0.5}) for c in ("none", "prune", "ptq")
    )
    benchmark = Benchmark(
        name="advft",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=defenses,
        protocols=(PluginSpec.of("advft-pgd", {}),),
        eps=(0.2,),
        n_samples=24,
        batch_size=12,
    )
    summary = run(benchmark, pm=pm, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu")
    cells = RunStore(summary.run_dir).read_cells().set_index("variant")
    assert (cells["status"] == "ok").all(), cells["error"].tolist()
    assert list(cells.index.sort_values()) == ["P(f_std)+AFT", "Q(f_std)+AFT", "f_std+AFT"]
    full, pruned, quant = cells.loc["f_std+AFT"], cells.loc["P(f_std)+AFT"], cells.loc["Q(f_std)+AFT"]
    assert pruned["params"] < full["params"] and pruned["macs"] < full["macs"]
    assert (quant["bits"], quant["params"], quant["macs"]) == (8, full["params"], full["macs"])
    assert quant["model_bytes"] * 4 == full["model_bytes"]
    assert quant["gradient_calls"] > 0 and quant["robust_acc"] < quant["clean_acc"]
    # provenance: the int8 kernels' engine, in the row and the manifest
    assert (quant["quantized_engine"], full["quantized_engine"]) == (ENGINE, "")
    engines = RunStore(summary.run_dir).read_manifest()["quantized_engines"]
    assert list(engines.values()) == [ENGINE] and "Q(f_std)+AFT" in next(iter(engines))
    # a resumed run (every cell read back from disk) writes the same manifest entry, also when
    # other rows come from a robench that wrote no engine column (read back as NaN)
    store = RunStore(summary.run_dir)
    table = store.read_cells()
    table["quantized_engine"] = pd.Series([e or None for e in table["quantized_engine"]], dtype=object)
    store.rewrite_cells(table)
    assert store.read_cells()["quantized_engine"].isna().sum() == 2
    run(benchmark, pm=pm, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu")
    assert RunStore(summary.run_dir).read_manifest()["quantized_engines"] == engines
