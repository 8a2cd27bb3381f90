"""The ProARD defense: dynamic nets, extraction, MACs, stages, RSLAD, search, caching, registration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robench.context import DataShape
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.errors import ConfigError
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.plugins.proard import SPACES, ProARD, Student, Trades, build
from robench.plugins.proard.losses import ShrinkingLoss, rslad_kl, rslad_loss
from robench.plugins.proard.nets import static_builder
from robench.plugins.proard.search import Costs, Space, candidates, parse_budget
from robench.plugins.proard.space import STAGES, decode, extreme_config, sample_config, stage_spaces
from robench.results.storage import RunStore
from robench.testing import TinyPlugin

GREY = DataShape(channels=1, height=28, width=28, num_classes=10, mean=(0.5,), std=(0.5,))
COLOUR = DataShape(channels=3, height=32, width=32, num_classes=100, mean=(0.5,) * 3, std=(0.25,) * 3)
MINI = ("resnet-mini", "mbv3-mini")
# Seconds on the tiny dataset (256 training images of 12x12), every phase still running.
TINY = {
    "space": "resnet-mini",
    "eps": 0.1,
    "attack_steps": 1,
    "teacher_epochs": 1,
    "teacher_subset": 64,
    "teacher_batch_size": 32,
    "stage_epochs": [1, 0, 1, 0, 1],
    "train_subset": 64,
    "batch_size": 32,
    "holdout": 32,
    "candidates": 2,
    "search_steps": 1,
    "bn_images": 32,
    "bn_batch": 16,
    "static_epochs": 1,
}


def trained_looking(net: nn.Module, shape: DataShape) -> nn.Module:
    """Running statistics and kernel transforms away from their initial values."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "transform" in name or name.endswith("bias") or ".bn" in name:
                p.add_(0.1 * torch.randn_like(p))
        net.train()(torch.rand(8, shape.channels, shape.height, shape.width))
    return net.eval()


@pytest.mark.parametrize("shape", [GREY, COLOUR], ids=["28grey", "32colour"])
@pytest.mark.parametrize("space", MINI)
def test_an_extracted_subnet_computes_what_the_dynamic_net_computes(space: str, shape: DataShape) -> None:
    net = trained_looking(build(space, shape), shape)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, shape.channels, shape.height, shape.width)
    configs = [extreme_config(net.lengths, net.choices, largest=b) for b in (True, False)]
    for config in configs + [sample_config(net.lengths, net.choices, gen) for _ in range(3)]:
        net.set_active(config)
        static = net.extract()
        assert not any(type(m).__module__.endswith(("layers", "resnet", "mbv3")) and "Dynamic" in type(m).__name__
                       for m in static.modules())  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(static(x), net(x), rtol=1e-5, atol=1e-5)
        assert static(x).shape == (4, shape.num_classes)


@pytest.mark.parametrize("space", MINI)
def test_macs_move_as_each_elastic_dimension_changes(space: str) -> None:
    net = build(space, GREY)
    costs = Costs(static_builder(space, GREY), torch.zeros(1, 1, 28, 28))
    largest = extreme_config(net.lengths, net.choices, largest=True)
    full = costs(largest)
    for dim, values in net.choices.items():
        for position in (0, net.lengths[dim] - 1):
            config = dict(largest)
            config[dim] = tuple(values[0] if i == position else v for i, v in enumerate(largest[dim]))
            smaller = costs(config)
            if dim == "e" and position != 0 and not _runs(net, config, position):
                continue  # the ratio of a block the depth skips: nothing to move
            assert smaller.macs < full.macs, f"{space}: lowering {dim}[{position}] must lower the MACs"
        whole = costs({**largest, dim: (values[0],) * net.lengths[dim]})
        assert whole.macs < full.macs and whole.params < full.params, f"{space}: all of {dim} at its smallest"
    assert costs(extreme_config(net.lengths, net.choices, largest=False)).macs < min(
        costs({**largest, dim: (v[0],) * net.lengths[dim]}).macs for dim, v in net.choices.items()
    )


def _runs(net: nn.Module, config: dict[str, tuple[float, ...]], position: int) -> bool:
    net.set_active(config)  # type: ignore[operator]
    active = {id(b) for stage in net._active_blocks() for b in (stage if isinstance(stage, list) else [stage])}  # type: ignore[operator]
    return id(net.blocks()[position]) in active  # type: ignore[operator]


def test_each_stage_enables_exactly_its_choices() -> None:
    resnet = {"w": (0.65, 0.8, 1.0), "d": (0.0, 1.0, 2.0), "e": (0.2, 0.25, 0.35)}
    width, depth1, depth2, expand1, expand2 = stage_spaces(resnet)
    assert width == {"w": (0.65, 0.8, 1.0), "d": (2.0,), "e": (0.35,)}
    assert depth1 == {"w": (0.65, 0.8, 1.0), "d": (1.0, 2.0), "e": (0.35,)}
    assert depth2 == {"w": (0.65, 0.8, 1.0), "d": (0.0, 1.0, 2.0), "e": (0.35,)}
    assert expand1 == {"w": (0.65, 0.8, 1.0), "d": (0.0, 1.0, 2.0), "e": (0.25, 0.35)}
    assert expand2 == resnet
    mbv3 = {"k": (3.0, 5.0, 7.0), "d": (2.0, 3.0, 4.0), "e": (3.0, 4.0, 6.0)}
    assert stage_spaces(mbv3)[0] == {"k": (3.0, 5.0, 7.0), "d": (4.0,), "e": (6.0,)}  # kernel first for MobileNet
    assert all(stage == mbv3 for stage in stage_spaces(mbv3, random=True))
    assert len(STAGES) == 5
    # the loss samples only what its stage enables, every enabled value eventually
    net = build("resnet-mini", GREY)
    loss = ShrinkingLoss(net, net.lengths, depth1, 3, (0.1, 0.025, 1), seed=0)
    seen = {dim: set() for dim in net.lengths}
    for _ in range(20):
        for config in loss.students():
            for dim, values in config.items():
                seen[dim] |= set(values)
    assert seen == {dim: set(values) for dim, values in depth1.items()}


def test_the_rslad_loss_matches_a_hand_checked_example() -> None:
    teacher = torch.tensor([[0.75, 0.25]])
    # mean over batch x classes of p_T (log(p_T + 1e-5) - log p_S), student uniform: by hand,
    # (0.75 ln 1.5 + 0.25 ln 0.5) / 2 = (0.304099 - 0.173287) / 2 = 0.065406, and the 1e-5 in
    # the log adds p_T * 1e-5 / p_T per class: + 2e-5 / 2
    by_hand = (0.75 * (math.log(0.75 + 1e-5) - math.log(0.5)) + 0.25 * (math.log(0.25 + 1e-5) - math.log(0.5))) / 2
    assert by_hand == pytest.approx(0.065406 + 1e-5, abs=1e-6)
    assert rslad_kl(torch.zeros(1, 2), teacher).item() == pytest.approx(by_hand, rel=1e-6)
    # a linear student; no ascent steps: x_adv is the start point, weighted 5/6 against 1/6 for x
    student = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x, start = torch.tensor([[0.5, 0.25]]), torch.tensor([[0.25, 0.75]])
    kl = [F.kl_div(F.log_softmax(student(v), 1), teacher, reduction="none").sum() / 2 for v in (start, x)]
    expected = 5 / 6 * kl[0] + 1 / 6 * kl[1]  # torch's KL equals the released form up to the 1e-5
    loss = rslad_loss(student, teacher, x, (0.5, 0.1, 0), start)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert rslad_loss(student, teacher, x, (0.5, 0.1, 0), start, adv_weight=0.0).item() == pytest.approx(
        kl[1].item(), abs=1e-4
    )
    # the inner maximisation raises the adversarial term and stays in the ball
    stepped = rslad_loss(student, teacher, x, (0.2, 0.05, 5), x.clone(), adv_weight=1.0)
    assert stepped.item() > rslad_loss(student, teacher, x, (0.2, 0.05, 0), x.clone(), adv_weight=1.0).item()


def test_epoch_sampling_trains_each_student_for_a_full_pass_and_state_resumes() -> None:
    net = build("resnet-mini", GREY)
    enabled = stage_spaces(net.choices)[-1]
    loss = ShrinkingLoss(net, net.lengths, enabled, 2, (0.1, 0.025, 1), seed=3, sampling="epoch", batches_per_pass=3)

    def draw() -> str:  # as a batch does: students, then the call counter
        configs = loss.students()
        loss.calls += 1
        return json.dumps(configs)

    draws = [draw() for _ in range(12)]
    assert draws[0] == draws[1] == draws[2] != draws[3] == draws[4] == draws[5]  # student 1 for 3 batches, then 2
    assert len(set(draws[:6])) == 2 and draws[6] not in draws[:6]  # new students next epoch
    fresh = ShrinkingLoss(net, net.lengths, enabled, 2, (0.1, 0.025, 1), seed=3, sampling="epoch", batches_per_pass=3)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.calls == 12 and json.dumps(fresh.students()) == json.dumps(loss.students())


@pytest.mark.parametrize("space", MINI)
def test_reorganizing_keeps_the_largest_network_and_students_reload(space: str) -> None:
    net = trained_looking(build(space, GREY), GREY)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        before = net(x)
        net.reorganize()
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    config = sample_config(net.lengths, net.choices, torch.Generator().manual_seed(2))
    net.set_active(config)
    builder = static_builder(space, GREY)
    student = Student(net.extract(), config, builder)
    skeleton = Student(builder(extreme_config(net.lengths, net.choices, largest=True)), dict(net.choices), builder)
    skeleton.load_state_dict(student.state_dict())
    assert skeleton.config == config
    torch.testing.assert_close(skeleton.eval()(x), student.eval()(x))


def test_budgets_and_candidates() -> None:
    net = build("resnet-mini", GREY)
    space, costs = (
        Space(net.lengths, net.choices),
        Costs(static_builder("resnet-mini", GREY), torch.zeros(1, 1, 28, 28)),
    )
    gen = torch.Generator().manual_seed(0)
    assert candidates("smallest", space, costs, gen, 4) == [space.smallest()]
    assert candidates("largest", space, costs, gen, 4) == [space.largest()]
    limit = (costs(space.smallest()).macs + costs(space.largest()).macs) // 2
    found = candidates(f"macs:{limit}", space, costs, gen, 4)
    assert 2 <= len(found) <= 4 and all(costs(c).macs <= limit for c in found)
    with pytest.raises(ValueError, match="below the smallest"):
        candidates("macs:10", space, costs, gen, 4)
    with pytest.raises(ValueError, match="use smallest"):
        parse_budget("tiny")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"space": "vgg"}, "unknown space"),
        ({"stage_epochs": [1, 1]}, "one per stage"),
        ({"students": ["huge"]}, "use smallest"),
        ({"students": ["median", "median"]}, "twice"),
        ({"k": [0, 1, 1, 1, 1]}, "k >= 1"),
    ],
)
def test_bad_parameters_fail_before_any_compute(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProARD.create(params)


def test_presets_resolve_and_both_defenses_are_registered() -> None:
    for values in (*ProARD.presets.values(), *Trades.presets.values()):
        assert ProARD.create(dict(values)) if "space" in values or not values else Trades.create(dict(values))
    defenses = Registries.collect(get_plugin_manager()).defenses
    assert defenses.get("proard") is ProARD and defenses.get("trades") is Trades
    assert ProARD.create({"students": ["smallest", "macs:2e6"]}).variant_names() == ("smallest", "macs-2e+06")
    assert set(SPACES) == {"resnet", "resnet-mini", "mbv3", "mbv3-mini"}


def test_runner_reuses_the_teacher_and_reloads_students(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    defenses = tuple(PluginSpec.of("proard", {**TINY, "training": t}) for t in ("progressive", "random", "static"))
    benchmark = Benchmark(
        name="proard",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=defenses,
        attacks=(PluginSpec.of("pgd", {"steps": 2, "restarts": 1}),),
        eps=(0.2,),
        n_samples=24,
        batch_size=12,
    )
    tables = []
    for name in ("built", "loaded"):
        summary = run(benchmark, pm=pm, run_dir=tmp_path / name, cache_dir=tmp_path / "cache", device="cpu")
        tables.append(RunStore(summary.run_dir).read_cells().sort_values(["defense_params", "variant"]))
    built, loaded = (t.reset_index(drop=True) for t in tables)
    assert (built["status"] == "ok").all() and len(built) == 9, built["error"].tolist()
    assert (built["checks"] == "ok").all(), built["checks"].tolist()  # the conformance checks, on every student
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "models").glob("*/meta.json")]
    assert sorted(m["key"]["defense"] for m in metas).count("trades") == 1  # one teacher for both dynamic runs
    configs = built.set_index(["defense_params", "variant"])["variant_config"]
    assert all(decode(text) for text in configs)
    training = built["defense_params"].map(lambda p: json.loads(p)["training"])
    by_mode = {
        mode: built[training == mode].set_index("variant")["variant_config"] for mode in ("progressive", "static")
    }
    assert by_mode["static"].equals(by_mode["progressive"])  # static baselines train the progressive students' configs
    smallest = built[built["variant"] == "smallest"]
    assert (
        smallest["macs"].nunique() == 1
        and (smallest["macs"] < built[built["variant"] == "largest"]["macs"].min()).all()
    )
    assert loaded["build_seconds"].max() == 0  # second run: from the cache
    columns = ["clean_acc", "robust_acc", "macs", "params", "variant_config", "model_hash"]
    assert built[columns].equals(loaded[columns])
