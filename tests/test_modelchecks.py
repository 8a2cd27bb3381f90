"""The model checks run before every attack (robench/execute/modelcheck.py): each trap defense fires
exactly its check, the built-ins fire none, and what the runner does about each finding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pluggy
import pytest
import robench_traps
import torch
from robench_traps import TRAPS
from torch import nn

from robench import DEFAULT_EOT, DEFAULT_VOTES
from robench.defense import Variant
from robench.discover.manager import get_plugin_manager
from robench.execute.modelcheck import ModelContractError, as_evaluated, check_model
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.report import write_report
from robench.results.storage import RunStore
from robench.testing import CONFORMANCE_SHAPE, TinyPlugin, check_defense, tiny_data, tiny_model

SHAPE = CONFORMANCE_SHAPE
TINY_BASELINE = {"epochs": 3, "lr": 0.05}


def _inputs(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_data(n, SHAPE).batch(torch.arange(n))


def _checks(model: nn.Module, **variant: Any) -> list[str]:
    x, y = _inputs()
    v = Variant(name="model", model=model.eval(), **variant)
    return check_model(v, x, y, SHAPE.num_classes).fired(v.randomized)


# -- check_model on its own, on tiny models -------------------------------------------------


@pytest.mark.parametrize(
    ("wrapper", "fired"),
    [
        (robench_traps.Rounding, "vanishing_gradients"),
        (robench_traps.GaussianNoise, "undeclared_randomness"),
        (robench_traps.Softmax, "probability_outputs"),
    ],
)
def test_each_trap_fires_exactly_its_check(wrapper: type[nn.Module], fired: str) -> None:
    assert _checks(wrapper(tiny_model(SHAPE))) == [fired]


def test_batch_statistics_fire_the_batch_check_only() -> None:
    model = robench_traps.BatchStatistics(tiny_model(SHAPE), SHAPE.channels)
    assert _checks(model) == ["batch_dependent"]
    x, y = _inputs()
    checks = check_model(Variant("model", model.eval()), x, y, SHAPE.num_classes)
    assert checks.training_modules == ("norm",)  # the diagnosis names the module


def test_a_plain_model_fires_nothing_and_batchnorm_in_eval_mode_is_fine() -> None:
    assert _checks(tiny_model(SHAPE)) == []
    with_bn = nn.Sequential(nn.BatchNorm2d(1), tiny_model(SHAPE))
    with_bn[0].running_mean.fill_(0.3)
    assert _checks(with_bn) == []


def test_declared_randomness_is_expected_not_a_finding() -> None:
    x, y = _inputs()
    variant = Variant("model", robench_traps.GaussianNoise(tiny_model(SHAPE)).eval(), randomized=True)
    checks = check_model(variant, x, y, SHAPE.num_classes)
    assert checks.randomized and checks.fired(declared_randomized=True) == []
    assert not checks.batch_dependent  # not checked for random models: they change anyway


class _Saturated(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = 1e5 * self.model(x)
        return out


def test_saturated_logits_vanish_for_cross_entropy() -> None:
    # defensive-distillation-like logits: the softmax is exactly one-hot in float32, so the
    # cross-entropy gradient every default attack follows is exactly zero
    # (for the samples it classifies correctly: labels are its own predictions here)
    x, _ = _inputs()
    model = _Saturated(tiny_model(SHAPE)).eval()
    y = model(x).argmax(dim=1)
    checks = check_model(Variant("model", model), x, y, SHAPE.num_classes)
    assert checks.vanishing and checks.vanishing_share > 0.9
    assert check_model(Variant("model", model.model), x, y, SHAPE.num_classes).vanishing_share == 0


@pytest.mark.parametrize(
    ("wrapper", "message"),
    [
        (
            robench_traps.DropClasses,
            "returned a tensor of shape (32, 3); expected one floating tensor of shape (32, 4)",
        ),
        (robench_traps.WithFeatures, "returned a tuple of 2 (tensor (32, 4), tensor (32, 256)); expected one floating"),
    ],
)
def test_output_contract_errors_say_what_was_returned_and_expected(wrapper: type[nn.Module], message: str) -> None:
    x, y = _inputs()
    with pytest.raises(ModelContractError, match="variant 'model': its model ") as err:
        check_model(Variant("model", wrapper(tiny_model(SHAPE)).eval()), x, y, SHAPE.num_classes)
    assert message in str(err.value)


class _NaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), SHAPE.num_classes), float("nan"))


def test_non_finite_outputs_break_the_contract_of_the_attacked_model_too() -> None:
    x, y = _inputs()
    variant = Variant("model", tiny_model(SHAPE), grad_model=_NaN())
    with pytest.raises(ModelContractError, match=r"its attack model \(grad_model\) returned a tensor with 128 non"):
        check_model(variant, x, y, SHAPE.num_classes)


def test_probabilities_are_evaluated_as_their_log_with_the_same_verdicts() -> None:
    x, y = _inputs()
    base = tiny_model(SHAPE)
    variant = Variant("model", robench_traps.Softmax(base).eval())
    evaluated = as_evaluated(variant, check_model(variant, x, y, SHAPE.num_classes))
    with torch.no_grad():
        torch.testing.assert_close(evaluated.model(x), base(x).log_softmax(dim=1), atol=1e-5, rtol=1e-5)
        assert torch.equal(evaluated.attack_model(x).argmax(1), base(x).argmax(1))


def test_undeclared_randomness_is_evaluated_as_randomized() -> None:
    x, y = _inputs()
    variant = Variant("model", robench_traps.GaussianNoise(tiny_model(SHAPE)).eval())
    assert as_evaluated(variant, check_model(variant, x, y, SHAPE.num_classes)).randomized


# -- the built-in defenses ------------------------------------------------------------------

BUILTINS: list[tuple[str, dict[str, object]]] = [
    ("baseline", {"epochs": 1}),
    ("advt", {"epochs": 1}),
    ("eio", {"epochs": 1}),
    ("advft", {"finetune_epochs": 1, "attack_steps": 2}),
    ("advft", {"finetune_epochs": 1, "attack_steps": 2, "compression": "prune"}),
    ("advft", {"finetune_epochs": 1, "attack_steps": 2, "compression": "ptq"}),
    ("advft", {"finetune_epochs": 1, "attack_steps": 2, "compression": "qat"}),
]


@pytest.mark.parametrize(("name", "params"), BUILTINS, ids=lambda v: str(v))
def test_builtin_defenses_fire_no_check_except_rgns_declared_randomness(name: str, params: dict[str, object]) -> None:
    from robench.discover.registry import Registries

    registries = Registries.collect(get_plugin_manager())
    results = check_defense(registries.defenses.get(name), params)  # asserts that nothing fired
    for variant, checks in results.items():
        assert checks.randomized == (variant == "rgn"), variant  # and rgn is random, as it declares
        assert checks.vanishing_share == 0 and not checks.batch_dependent and not checks.training_modules


# -- through the runner ---------------------------------------------------------------------


@pytest.fixture
def trap_pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    manager.register(robench_traps, name="traps")
    return manager


def _trap_run(pm: pluggy.PluginManager, tmp: Path, names: list[str], name: str = "run", **kw: Any) -> pd.DataFrame:
    benchmark = Benchmark(
        name="traps",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=tuple(PluginSpec.of(n, TINY_BASELINE) for n in names),
        attacks=(PluginSpec.of("pgd", {"steps": 5, "restarts": 1}),),
        eps=(0.3,),
        n_samples=64,
        batch_size=32,
    )
    run(benchmark, pm=pm, run_dir=tmp / name, cache_dir=tmp / "cache", device="cpu", **kw)
    return RunStore(tmp / name).read_cells().set_index("defense")


def test_runner_rows_name_exactly_the_check_each_trap_fires(trap_pm: pluggy.PluginManager, tmp_path: Path) -> None:
    cells = _trap_run(trap_pm, tmp_path, ["baseline", *TRAPS, "trap-classes", "trap-tuple"])
    flags = [c for c in cells.columns if c.startswith("flag_") and c != "flag_loss_not_increasing"]
    assert cells.loc["baseline", "checks"] == "ok" and not cells.loc["baseline", flags].any()
    for defense, check in TRAPS.items():
        row = cells.loc[defense]
        assert row["status"] == "ok" and row["checks"] == check, defense
        raised = [f for f in flags if row[f]]
        assert raised == [f"flag_{check}"], (defense, raised)
        assert row["check_samples"] == 32  # the checks ran; what they cost: benchmarks/model_checks.py
    for defense in ("trap-classes", "trap-tuple"):
        row = cells.loc[defense]
        assert row["status"] == "error" and row["error"].startswith("model checks: ModelContractError: variant 'model'")
    noise = cells.loc["trap-noise"]  # evaluated as randomized, as a declared one would be
    assert noise["randomized"] and noise["eot"] == DEFAULT_EOT and noise["votes"] == DEFAULT_VOTES
    assert noise["check_randomized"] and noise["eot_half"] == DEFAULT_EOT // 2  # and the EOT probe ran
    soft, base = cells.loc["trap-softmax"], cells.loc["baseline"]
    assert abs(soft["robust_acc"] - base["robust_acc"]) <= 2 / 64  # attacked through log-probabilities
    assert base["robust_acc"] < base["clean_acc"]  # the attack does something at this eps


def test_vanishing_gradients_add_transfer_and_square_versions(trap_pm: pluggy.PluginManager, tmp_path: Path) -> None:
    row = _trap_run(trap_pm, tmp_path, ["trap-rounding"]).loc["trap-rounding"]
    versions = json.loads(row["versions"])
    assert versions[0].startswith("pgd") and any("@check-baseline" in v for v in versions) and "square" in versions[-1]
    found = json.loads(row["masking_found_by"])
    assert set(found) == {"pgd[restarts=1,stop_on_success=False]@check-baseline", "square[n_queries=1000]"}
    assert sum(found.values()) > 0 and row["transfer_sets"] != "[]"
    report = write_report(tmp_path / "run")[0].read_text()
    section = report.split("## Model checks", 1)[1].split("## ", 1)[0]
    assert "0 of 1 cells: ok" in section and "vanishing_gradients; samples the added versions fooled: `pgd" in section


def test_undeclared_randomness_gives_the_same_numbers_whatever_ran_before(
    trap_pm: pluggy.PluginManager, tmp_path: Path
) -> None:
    alone = _trap_run(trap_pm, tmp_path, ["trap-noise"], "alone")
    after = _trap_run(trap_pm, tmp_path, ["baseline", "trap-noise", "trap-softmax"], "after")
    torch.randn(1000)  # moves the global generator between runs
    again = _trap_run(trap_pm, tmp_path, ["trap-noise", "trap-softmax"], "again")
    for table in (after, again):
        assert table.loc["trap-noise", "robust_acc"] == alone.loc["trap-noise", "robust_acc"]
        assert table.loc["trap-noise", "clean_acc"] == alone.loc["trap-noise", "clean_acc"]


@pytest.mark.slow
def test_input_rounding_on_fashion_mnist_is_no_longer_reported_robust(tmp_path: Path) -> None:
    # The trap: 3-bit input rounding over the baseline reported 76 % robust at eps 0.1
    # under PGD. With the transfer and Square versions the masking diagnosis adds, the row
    # must fall to the baseline's level (measured: 6.0 % against 15.5 % for the baseline).
    pm = get_plugin_manager()
    pm.register(robench_traps, name="traps")
    cheap = {"train_subset": 6000, "epochs": 2, "batch_size": 32}
    benchmark = Benchmark(
        name="rounding",
        defenses=(PluginSpec.of("baseline", cheap), PluginSpec.of("trap-rounding", cheap)),
        attacks=(PluginSpec.of("pgd", {"steps": 10, "restarts": 1}),),
        eps=(0.1,),
        n_samples=200,
    )
    run(benchmark, pm=pm, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu")
    cells = RunStore(tmp_path / "run").read_cells().set_index("defense")
    rounding = cells.loc["trap-rounding"]
    assert rounding["flag_vanishing_gradients"] and rounding["clean_acc"] > 0.7
    assert rounding["robust_acc"] <= 0.20, rounding["robust_acc"]
    assert cells.loc["baseline", "checks"] == "ok"
