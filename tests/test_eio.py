"""The EIO defense plugin: random gated network, training step, derivation, caching, registration."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from robench.architecture import make_model
from robench.cli import cli
from robench.context import Context, DataShape
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.errors import ConfigError
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plan.grid import resolve_defense
from robench.plugin import PluginSpec
from robench.plugins.architectures import CNN8, ResNet20
from robench.plugins.eio import EnsembleInOne, RandomGatedNetwork, build_rgn, derive
from robench.plugins.eio.model import GatedBlock
from robench.plugins.eio.train import Distillation, distill, diversification_step, sample_distinct_paths
from robench.results.storage import RunStore
from robench.testing import TinyPlugin, check_defense, tiny_context, tiny_data

SHAPE = DataShape(channels=1, height=28, width=28, num_classes=10, mean=(0.5,), std=(0.5,))
EXAMPLE = torch.zeros(1, 1, 28, 28)
# Seconds on a tiny context, with every phase still running.
FAST = {"warmup_epochs": 1, "epochs": 1, "finetune_epochs": 1, "distill_steps": 2, "batch_size": 64}


def factory(arch: type[CNN8] | type[ResNet20]) -> nn.Module:
    return make_model(arch.create(), SHAPE)


def rgn_of(arch: type[CNN8] | type[ResNet20], share: bool = False, seed: int = 0) -> RandomGatedNetwork:
    torch.manual_seed(seed)
    return build_rgn(lambda: factory(arch), 2, share, EXAMPLE)


def trained_looking(rgn: RandomGatedNetwork) -> RandomGatedNetwork:
    """Candidates start as equal copies; make them differ as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in rgn.blocks:
            for candidate in block.paths:
                for tensor in candidate.state_dict(keep_vars=True).values():
                    if tensor.is_floating_point():
                        tensor.mul_(1 + 0.2 * torch.rand(tensor.shape, generator=gen))
    return rgn


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def context_28(tmp: Path, arch: type[CNN8] | type[ResNet20] = CNN8) -> Context:
    data = tiny_data(64, SHAPE)
    return Context(
        train=data,
        shape=SHAPE,
        new_model=lambda: factory(arch),
        device=torch.device("cpu"),
        seed=0,
        preset="smoke",
        cache_dir=tmp,
    )


# -- construction -------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "blocks"), [(CNN8, 6), (ResNet20, 19)])
def test_every_conv_but_shortcuts_becomes_a_two_path_block(arch: type[CNN8] | type[ResNet20], blocks: int) -> None:
    rgn = rgn_of(arch)
    assert len(rgn.blocks) == blocks and rgn.num_layers == blocks + 1
    assert all(len(b.paths) == 2 for b in rgn.blocks)
    assert len([m for m in rgn.modules() if isinstance(m, GatedBlock)]) == blocks
    names = [b.conv_name for b in rgn.blocks]
    assert not any("shortcut" in n for n in names)  # 1x1 shortcuts stay ungated
    assert sum(isinstance(m, nn.Linear) for m in rgn.modules()) == sum(
        isinstance(m, nn.Linear) for m in factory(arch).modules()
    )


def test_blocks_are_in_forward_order_with_the_activation_after_each() -> None:
    rgn = rgn_of(ResNet20)
    assert rgn.blocks[0].conv_name.endswith("stem.conv")
    assert rgn.blocks[1].conv_name.endswith("stages.0.0.residual.conv1")
    assert rgn.blocks[2].conv_name.endswith("stages.0.0.residual.conv2")
    assert all(isinstance(f, nn.ReLU) for f in rgn.feature_modules)
    block = rgn.net.get_submodule("1.stages.0.0")
    assert rgn.feature_modules[1] is block.residual.relu1 and rgn.feature_modules[2] is block.relu_out


def test_paper_form_gives_every_path_its_own_weights() -> None:
    rgn = rgn_of(ResNet20)
    for block in rgn.blocks:
        first, second = (dict(c.state_dict(keep_vars=True)) for c in block.paths)
        assert all(first[k].data_ptr() != second[k].data_ptr() for k in first)
        assert torch.equal(first["conv.weight"], second["conv.weight"])  # deep copies: an equal start
    with torch.no_grad():
        rgn.blocks[0].paths[0].conv.weight.add_(1)
    assert not torch.equal(rgn.blocks[0].paths[0].conv.weight, rgn.blocks[0].paths[1].conv.weight)


def test_shared_form_shares_convs_but_not_batchnorms() -> None:
    rgn = rgn_of(ResNet20, share=True)
    for block in rgn.blocks:
        a, b = block.paths
        assert a.conv.weight is b.conv.weight
        assert a.bn is not None and b.bn is not None and a.bn is not b.bn
        assert a.bn.running_mean.data_ptr() != b.bn.running_mean.data_ptr()


def test_shared_form_needs_batchnorms() -> None:
    with pytest.raises(ValueError, match="needs a BatchNorm"):
        rgn_of(CNN8, share=True)


# -- forward ------------------------------------------------------------------------


def test_a_forward_pass_runs_exactly_one_path_per_block() -> None:
    rgn = rgn_of(ResNet20).eval()
    calls = {id(c): 0 for b in rgn.blocks for c in b.paths}
    for block in rgn.blocks:
        for c in block.paths:
            c.register_forward_hook(lambda m, _i, _o: calls.__setitem__(id(m), calls[id(m)] + 1))
    chosen = []
    for _ in range(4):
        for k in calls:
            calls[k] = 0
        rgn(images(2))
        assert all(sum(calls[id(c)] for c in b.paths) == 1 for b in rgn.blocks)
        chosen.append(tuple(b.active for b in rgn.blocks))
    assert len(set(chosen)) > 1  # gates are random


def test_a_fixed_path_is_deterministic_and_its_derived_network_has_no_gates() -> None:
    rgn = trained_looking(rgn_of(ResNet20)).eval()
    path = rgn.sample_path(torch.Generator().manual_seed(3))
    x = images()
    rgn.set_path(path)
    first, second = rgn(x), rgn(x)
    assert torch.equal(first, second)
    plain = derive(rgn, path, lambda: factory(ResNet20)).eval()
    assert not any(isinstance(m, GatedBlock) for m in plain.modules())
    assert plain.state_dict().keys() == factory(ResNet20).state_dict().keys()
    torch.testing.assert_close(plain(x), first, rtol=0, atol=1e-6)
    other = tuple(1 - c for c in path)
    with rgn.using(other):
        assert not torch.allclose(rgn(x), first)
    assert rgn.fixed == path


def test_random_gates_restart_with_reseed() -> None:
    rgn = trained_looking(rgn_of(CNN8)).eval()
    x = images()
    rgn.reseed(7)
    first = [rgn(x) for _ in range(3)]
    rgn.reseed()
    assert all(torch.equal(a, rgn(x)) for a in first)


# -- training -----------------------------------------------------------------------


def test_distillation_reduces_the_feature_distance_it_targets() -> None:
    rgn = rgn_of(CNN8).eval()
    path = rgn.sample_path(torch.Generator().manual_seed(0))
    x_s, x_t = images(8, 1), images(8, 2)
    cfg = Distillation(eps=0.07, steps=10)
    x_d = distill(rgn, path, 3, x_s, x_t, cfg, torch.Generator().manual_seed(0))
    assert float((x_d - x_s).abs().max()) <= 0.07 + 1e-6 and float(x_d.min()) >= 0 and float(x_d.max()) <= 1
    with torch.no_grad(), rgn.using(path):
        target = rgn.features(x_t, 3)
        before = torch.nn.functional.mse_loss(rgn.features(x_s, 3), target)
        after = torch.nn.functional.mse_loss(rgn.features(x_d, 3), target)
    assert after < before
    assert not rgn.training  # distillation restores the mode it found


def test_sampled_paths_differ_in_their_first_gates() -> None:
    rgn = rgn_of(ResNet20)
    gen = torch.Generator().manual_seed(0)
    for prefix in (1, 2, 5, 19):
        paths = sample_distinct_paths(rgn, 2 if prefix == 1 else 3, prefix, gen)
        assert len({p[:prefix] for p in paths}) == len(paths)
    with pytest.raises(ValueError, match="distinct"):
        sample_distinct_paths(rgn, 3, 1, gen)


def test_a_training_step_changes_exactly_the_sampled_paths() -> None:
    rgn = rgn_of(ResNet20)
    before = {k: v.clone() for k, v in rgn.state_dict().items()}
    opt = torch.optim.SGD(rgn.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    batch = (images(8, 1), torch.arange(8) % 10, images(8, 2))
    result = diversification_step(rgn, opt, batch, Distillation(steps=2), torch.Generator().manual_seed(5))
    assert 2 <= len(result.paths) <= 3 and 1 <= result.layer <= 20
    after = rgn.state_dict()
    for b, block in enumerate(rgn.blocks):
        used = {path[b] for path in result.paths}
        for c in range(2):
            prefix = f"{block.conv_name}.paths.{c}."
            tensors = [k for k in after if k.removeprefix("net.").startswith(prefix) and "num_batches" not in k]
            changed = [not torch.equal(before[k], after[k]) for k in tensors]
            assert all(changed) if c in used else not any(changed), (block.conv_name, c, used)
    assert not torch.equal(before["net.1.fc.weight"], after["net.1.fc.weight"])  # ungated layers train too


# -- the defense --------------------------------------------------------------------


def test_fit_is_reproducible_and_round_trips_through_skeletons(tmp_path: Path) -> None:
    defense = EnsembleInOne.create(FAST)
    models = defense.fit(tiny_context(tmp_path))
    again = defense.fit(tiny_context(tmp_path))
    for name in models:
        a, b = models[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    skeletons = defense.skeletons(tiny_context(tmp_path))
    x = tiny_data(8).batch(torch.arange(8))[0]
    for name, model in models.items():
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        buffer.seek(0)
        skeletons[name].load_state_dict(torch.load(buffer, weights_only=True))
        first, loaded = defense.variant(name, model.eval()), defense.variant(name, skeletons[name].eval())
        assert torch.equal(first.model(x), loaded.model(x)), name


def test_skeletons_of_real_architectures_take_the_weights(tmp_path: Path) -> None:
    for arch in (CNN8, ResNet20):
        ctx = context_28(tmp_path, arch)
        defense = EnsembleInOne.create({"ensemble_k": 2})
        rgn = defense.new_rgn(ctx)
        derived = derive(rgn, rgn.sample_path(), ctx.new_model)
        skeletons = defense.skeletons(ctx)
        skeletons["rgn"].load_state_dict(rgn.state_dict())
        skeletons["derived"].load_state_dict(derived.state_dict())
        assert len(skeletons["derived-ensemble-2"].state_dict()) == 2 * len(derived.state_dict())


def test_conforms() -> None:
    check_defense(EnsembleInOne, FAST)
    check_defense(EnsembleInOne, {**FAST, "ensemble_k": 2, "paths_per_batch": 2, "augment": "crop-flip"})


def test_variants_follow_the_parameters(tmp_path: Path) -> None:
    assert EnsembleInOne.create().variant_names() == ("derived", "rgn")
    defense = EnsembleInOne.create({**FAST, "ensemble_k": 2})
    assert defense.variant_names() == ("derived", "rgn", "derived-ensemble-2")
    models = defense.fit(tiny_context(tmp_path))
    assert defense.variant("rgn", models["rgn"]).randomized
    assert not defense.variant("derived", models["derived"]).randomized
    assert not defense.variant("derived-ensemble-2", models["derived-ensemble-2"]).randomized
    assert not any(isinstance(m, GatedBlock) for m in models["derived-ensemble-2"].modules())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_paths": 1}, "n_paths"),
        ({"paths_per_batch": 1}, "paths_per_batch"),
        ({"eps_d": 0.0}, "eps_d"),
        ({"distill_steps": 0}, "distill_steps"),
        ({"epochs": -1}, "epoch"),
        ({"ensemble_k": 0}, "ensemble_k"),
        ({"augment": "flip"}, "augment"),
    ],
)
def test_bad_parameters_fail_before_any_compute(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EnsembleInOne.create(params)


def test_presets_resolve() -> None:
    for name, values in EnsembleInOne.presets.items():
        defense = EnsembleInOne.create(dict(values))
        assert defense.n_paths == 2 and defense.paths_per_batch == 3 and defense.eps_d == 0.07, name
    registries = Registries.collect(get_plugin_manager())
    cifar = resolve_defense(registries, PluginSpec.of("eio", {}), "paper", "cifar10")  # paper, then paper:cifar10
    assert (cifar.warmup_epochs, cifar.epochs, cifar.milestones, cifar.finetune_epochs) == (200, 200, (100, 150), 15)
    assert cifar == EnsembleInOne.create(), "field defaults are the paper's CIFAR values"
    fashion = resolve_defense(registries, PluginSpec.of("eio", {}), "paper", "fashion-mnist")
    assert (fashion.warmup_epochs, fashion.epochs, fashion.lr, fashion.augment) == (20, 20, 0.01, "none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("share", [False, True])
def test_fit_runs_on_cuda(tmp_path: Path, share: bool) -> None:
    ctx = dataclasses.replace(context_28(tmp_path, ResNet20), device=torch.device("cuda"))
    defense = EnsembleInOne.create({**FAST, "ensemble_k": 2, "share_conv_weights": share, "augment": "crop-flip"})
    models = defense.fit(ctx)
    x = images(4).cuda()
    for name, model in models.items():
        assert defense.variant(name, model.eval()).model(x).shape == (4, 10), name


# -- registration and the runner ----------------------------------------------------


def test_eio_is_registered() -> None:
    assert Registries.collect(get_plugin_manager()).defenses.get("eio") is EnsembleInOne
    result = CliRunner().invoke(cli, ["list", "defenses"])
    assert result.exit_code == 0 and "eio" in result.output


def test_runner_reloads_the_cached_models_and_gets_the_same_table(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    benchmark = Benchmark(
        name="eio",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("eio", FAST),),
        attacks=(PluginSpec.of("pgd", {"steps": 2, "restarts": 1}),),
        eps=(0.2,),
        n_samples=24,
        batch_size=12,
    )
    tables = []
    for name in ("built", "loaded"):
        summary = run(benchmark, pm=pm, run_dir=tmp_path / name, cache_dir=tmp_path / "cache", device="cpu")
        tables.append(RunStore(summary.run_dir).read_cells().sort_values("variant").reset_index(drop=True))
    built, loaded = tables
    assert list(built["variant"]) == ["derived", "rgn"] and (built["status"] == "ok").all()
    assert list(built["randomized"]) == [False, True]
    assert built["build_seconds"].max() > 0 and loaded["build_seconds"].max() == 0  # second run: from cache
    columns = ["clean_acc", "robust_acc", "model_hash"]
    assert built[columns].equals(loaded[columns])
