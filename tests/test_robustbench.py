"""The robustbench defense, on weights files the tests write in RobustBench's own layout.

RobustBench's real constructors build the architectures. The CARD networks are built
narrower (``width=8``, same classes and keys) by patching their zoo entries, except in one
test that loads the real-size Binary CARD, so the loader is exercised on the real shapes too.
Downloads, trust on first use, published numbers and ``robench zoo``: test_robustbench_zoo.py.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pluggy
import pytest
import torch
from torch import nn

import robench
from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plugins.robustbench import RobustBenchModel
from robench.plugins.robustbench.compat import import_robustbench
from robench.plugins.robustbench.facts import leaderboard
from robench.plugins.robustbench.weights import (
    MANIFEST,
    SOFTMAX_ENSEMBLES,
    LogMeanSoftmax,
    hashes_of,
    read_manifest,
    weight_files,
)
from robench.results.storage import RunStore
from robench.testing import TinyPlugin

LRR, DECK, BINARY = (
    "Diffenderfer2021Winning_LRR",
    "Diffenderfer2021Winning_LRR_CARD_Deck",
    "Diffenderfer2021Winning_Binary",
)
CIFAR10 = robench.DataShape(3, 32, 32, 10, (0.491, 0.482, 0.447), (0.247, 0.243, 0.262))


def zoo(dataset: str = "cifar10", threat_model: str = "corruptions") -> Any:
    import_robustbench()
    enums = importlib.import_module("robustbench.model_zoo.enums")
    models = importlib.import_module("robustbench.model_zoo").model_dicts
    return models[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """RobustBench's CIFAR-10 CARD LRR networks at width 8 (its own classes, its own keys)."""
    import_robustbench()
    cifar10 = importlib.import_module("robustbench.model_zoo.cifar10")
    monkeypatch.setitem(zoo()[LRR], "model", lambda: cifar10.Diffenderfer2021CARD(width=8))
    monkeypatch.setitem(zoo()[DECK], "model", lambda: cifar10.Diffenderfer2021CARD_Deck(width=8))


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A model from ``make`` with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = make()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + (0.5 if name.endswith("var") else -0.5))
    return model.eval()


def release(model: nn.Module, path: Path, extra: dict[str, torch.Tensor] | None = None) -> str:
    """Save ``model`` as RobustBench's files are: a ``state_dict`` entry with DataParallel's
    ``module.`` prefix and without the normalisation constants; return the file's sha256."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k not in ("mu", "sigma")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {**state, **(extra or {})}, "epoch": 200}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(path: Path, entries: dict[str, dict[str, str | None]]) -> str:
    path.write_text(json.dumps({"format": 1, "models": entries}))
    return str(path)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First-use pins of a context without a cache folder go to the test's own folder, never the user's."""
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "robench-cache"))


def context(shape: robench.DataShape = CIFAR10, dataset: str = "cifar10", cache: Path | None = None) -> robench.Context:
    """A build context; ``cache`` is the cache folder of first-use pins (default: ``$ROBENCH_CACHE``, the test's)."""
    data = robench.ImageData(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    work = (cache or Path("unused")) / "work"  # the robustbench defense keeps nothing there
    return robench.Context(
        data, shape, nn.Identity, torch.device("cpu"), 0, "smoke", work, dataset=dataset, cache_root=cache
    )


@pytest.fixture
def lrr(tmp_path: Path, narrow: None) -> tuple[nn.Module, dict[str, Any]]:
    """A width-8 CARD LRR saved under tmp/cifar10/corruptions/, and defense params pinning it."""
    reference = seeded(zoo()[LRR]["model"], 0)
    digest = release(reference, tmp_path / "cifar10" / "corruptions" / f"{LRR}.pt")
    manifest = write_manifest(tmp_path / "manifest.json", {f"cifar10/corruptions/{LRR}": {f"{LRR}.pt": digest}})
    params = {"model_name": LRR, "threat_model": "corruptions", "dataset": "cifar10", "model_dir": str(tmp_path)}
    return reference, {**params, "manifest": manifest}


def test_a_single_model_predicts_as_robustbench_architecture_and_the_row_gets_its_hash(
    lrr: tuple[nn.Module, dict[str, Any]],
) -> None:
    reference, params = lrr
    defense = RobustBenchModel.create(params)
    model = defense.fit(context())["model"]
    x = torch.rand(2, 3, 32, 32)
    assert type(model).__name__ == "Diffenderfer2021CARD" and not model.training
    assert torch.equal(model(x), reference(x))
    skeleton = defense.skeletons(context())["model"]  # the cache loads its copy into this
    skeleton.load_state_dict(model.state_dict())
    assert torch.equal(skeleton(x), reference(x))
    digest = json.loads(Path(params["manifest"]).read_text())["models"][f"cifar10/corruptions/{LRR}"][f"{LRR}.pt"]
    assert defense.sha256 == digest and defense.variant("model", model).weights_sha256 == digest
    assert json.loads(defense.canonical())["sha256"] == digest  # in the model key and defense_params
    assert hashes_of(skeleton) == [digest]  # a cached copy says which file its weights came from


def test_the_real_size_binary_card_loads_from_robustbench_release_format(tmp_path: Path) -> None:
    reference = seeded(zoo()[BINARY]["model"], 1)  # WidePreActResNet-18, 25M parameters
    scores = {f"module.{k.removesuffix('weight')}scores": torch.rand(3) for k in ("conv1.weight", "fc.weight")}
    digest = release(reference, tmp_path / "cifar10" / "corruptions" / f"{BINARY}.pt", extra=scores)
    defense = RobustBenchModel.create(
        {"model_name": BINARY, "threat_model": "corruptions", "dataset": "cifar10"}
        | {"model_dir": str(tmp_path), "sha256": digest, "manifest": write_manifest(tmp_path / "m.json", {})}
    )
    model = defense.fit(context())["model"]
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), reference(x))  # edge-popup scores ignored, mu/sigma from the constructor


def test_a_deck_gives_the_log_of_its_members_mean_softmax(tmp_path: Path, narrow: None) -> None:
    deck = seeded(zoo()[DECK]["model"], 2)
    folder = tmp_path / "cifar10" / "corruptions"
    hashes = [release(member, folder / f"{DECK}.pt_m{i}.pt") for i, member in enumerate(deck.models)]
    files = {f"{DECK}.pt_m{i}.pt": h for i, h in enumerate(hashes)}
    manifest = write_manifest(tmp_path / "manifest.json", {f"cifar10/corruptions/{DECK}": files})
    defense = RobustBenchModel.create(
        {"model_name": DECK, "threat_model": "corruptions", "dataset": "cifar10", "model_dir": str(tmp_path)}
        | {"manifest": manifest}
    )
    model = defense.fit(context())["model"]
    x = torch.rand(4, 3, 32, 32)
    probabilities = deck(x)  # RobustBench's own forward: the mean of the 6 cards' softmax
    assert isinstance(model, LogMeanSoftmax) and len(deck.models) == 6
    torch.testing.assert_close(model(x), torch.log(probabilities), rtol=0, atol=1e-5)
    assert torch.equal(model(x).argmax(1), probabilities.argmax(1))
    assert defense.variant("model", model).weights_sha256 == ",".join(hashes)
    skeleton = defense.skeletons(context())["model"]
    skeleton.load_state_dict(model.state_dict())
    torch.testing.assert_close(skeleton(x), model(x), rtol=0, atol=0)


def test_the_shipped_manifest_covers_the_card_models_in_robustbench_layout() -> None:
    entries = read_manifest(MANIFEST)
    for dataset in ("cifar10", "cifar100"):
        names = [f"{dataset}/corruptions/{name}" for name in (LRR, DECK, BINARY, BINARY + "_CARD_Deck")]
        assert set(names) <= set(entries)
    for key, files in entries.items():  # each entry is a loadable zoo model, with one file per part
        dataset, threat_model, name = key.split("/")
        ids = zoo(dataset, threat_model)[name]["gdrive_id"]
        assert ids is not None and (not isinstance(ids, list) or name in SOFTMAX_ENSEMBLES), key
        assert list(files) == weight_files(name, len(ids) if isinstance(ids, list) else 1), key
    assert len(entries[f"cifar10/corruptions/{DECK}"]) == 6


def test_a_wrong_hash_names_the_file_the_expected_and_the_found_hash(lrr: tuple[nn.Module, dict[str, Any]]) -> None:
    _, params = lrr
    path = Path(params["model_dir"]) / "cifar10" / "corruptions" / f"{LRR}.pt"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    defense = RobustBenchModel.create(params)
    release(seeded(zoo()[LRR]["model"], 9), path)  # other weights under the pinned name
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(robench.CacheError, match="wrong sha256") as info:
        defense.fit(context())
    assert f"robustbench weights file {path} has the wrong sha256: expected {expected}, found {found}." in str(
        info.value
    )
    assert path.is_file()  # refused, not deleted: the user decides


def test_unknown_names_suggest_near_matches_at_planning(lrr: tuple[nn.Module, dict[str, Any]]) -> None:
    _, params = lrr
    with pytest.raises(robench.ConfigError) as info:  # not in the manifest: RobustBench's zoo decides, at planning
        RobustBenchModel.create({**params, "model_name": "Diffenderfer2021Winning_LR"})
    assert str(info.value).startswith(
        "RobustBench has no cifar10 corruptions model 'Diffenderfer2021Winning_LR'. Did you mean: "
        "Diffenderfer2021Winning_LRR"
    )
    assert f"Close entries of the manifest {params['manifest']}: cifar10/corruptions/{LRR}." in str(info.value)
    with pytest.raises(robench.ConfigError, match="It is a corruptions model: -D threat_model=corruptions"):
        RobustBenchModel.create({**params, "threat_model": "Linf", "sha256": "0" * 64})


def test_a_zoo_model_outside_the_manifest_is_planned_and_trusted_on_first_use(tmp_path: Path) -> None:
    params = {"model_name": "Engstrom2019Robustness", "dataset": "cifar10", "threat_model": "L2"}
    defense = RobustBenchModel.create({**params, "manifest": write_manifest(tmp_path / "m.json", {})})
    assert defense.sha256 == "" and defense.hashes() == []  # nothing pins it: its first use will
    assert defense.network("cnn8") == "Engstrom2019Robustness (RobustBench)"  # no published facts shipped


def test_dataset_mismatches_are_errors(lrr: tuple[nn.Module, dict[str, Any]]) -> None:
    _, params = lrr
    defense = RobustBenchModel.create(params)
    with pytest.raises(robench.ConfigError) as info:
        defense.fit(context(dataset="cifar100"))
    assert str(info.value) == (
        f"robustbench model cifar10/corruptions/{LRR} is a cifar10 model, but the cell's dataset is cifar100: "
        "use --dataset cifar10, or the cifar100 model (-D dataset=cifar100)"
    )
    grey = robench.DataShape(1, 28, 28, 10, (0.5,), (0.5,))
    with pytest.raises(robench.ConfigError, match="takes 3x32x32 images in 10 classes; dataset fashion-mnist has 1x28"):
        defense.fit(context(grey, "fashion-mnist"))
    with pytest.raises(robench.ConfigError, match="this cell's dataset is not one robench evaluates") as info:
        RobustBenchModel.create({**params, "dataset": ""})  # e.g. --dataset fashion-mnist: no preset sets it
    hint = f"({LRR} is a cifar10 and cifar100 model). Run with --dataset cifar10 or --dataset cifar100,"
    assert hint in str(info.value)
    with pytest.raises(robench.ConfigError, match="dataset='imagenet' is not one robench evaluates"):
        RobustBenchModel.create({**params, "dataset": "imagenet"})


def test_files_that_are_not_plain_weights_or_do_not_fit_are_refused(
    lrr: tuple[nn.Module, dict[str, Any]], tmp_path: Path
) -> None:
    _, params = lrr
    path = tmp_path / "cifar10" / "corruptions" / f"{LRR}.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)  # unpickling would build an object
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    unpinned = write_manifest(tmp_path / "null.json", {})
    with pytest.raises(robench.CacheError, match=r"does not load as weights with torch.load\(weights_only=True\)"):
        RobustBenchModel.create({**params, "manifest": unpinned, "sha256": digest}).fit(context())
    digest = release(nn.Linear(2, 2), path)
    with pytest.raises(robench.CacheError, match="does not fit RobustBench's architecture: it lacks"):
        RobustBenchModel.create({**params, "manifest": unpinned, "sha256": digest}).fit(context())


def test_ensembles_that_do_not_average_softmax_are_refused(tmp_path: Path) -> None:
    empty = write_manifest(tmp_path / "manifest.json", {})
    defense = RobustBenchModel.create(
        {"model_name": "Bai2024MixedNUTS", "dataset": "cifar10", "sha256": "0" * 64} | {"manifest": empty}
    )
    with pytest.raises(robench.ConfigError, match="Bai2024MixedNUTS is not supported"):
        defense.fit(context())


def test_robustbench_is_imported_only_to_build_and_its_shims_do_not_outlive_the_import() -> None:
    code = (
        "import sys\n"
        "from robench.discover.manager import get_plugin_manager\n"
        "from robench.discover.registry import Registries\n"
        "Registries.collect(get_plugin_manager()).defenses.get('robustbench')\n"
        "print('robustbench' in sys.modules, 'timm' in sys.modules)\n"
        "from robench.plugins.robustbench.compat import import_robustbench\n"
        "rb = import_robustbench()\n"
        "import pyautoattack\n"
        "print(rb.eval.AutoAttack is pyautoattack.AutoAttack, rb.loaders.pkg_resources.resource_filename(\n"
        "    'robustbench.loaders', 'helper_files/x.txt').endswith('robustbench/helper_files/x.txt'))\n"
        "print(sorted(m for m in ('pkg_resources', 'autoattack', 'autoattack.state') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["False False", "True True", "[]"]


@dataclass(frozen=True, kw_only=True)
class CifarShaped(robench.Dataset):
    """Random CIFAR-10-shaped images (a stand-in for cifar10, which needs the real files)."""

    name: ClassVar[str] = "cifar-shaped"
    shape: ClassVar[robench.DataShape] = CIFAR10

    def locate(self) -> str:
        return "generated in memory"

    def load(self, split: robench.Split) -> robench.ImageData:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
        return robench.ImageData(images, torch.randint(0, 10, (16,), generator=g))


class _CifarShapedPlugin:
    @robench.hookimpl
    def robench_datasets(self) -> list[type[robench.Dataset]]:
        return [CifarShaped]


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    manager.register(_CifarShapedPlugin(), name="cifar-shaped")
    return manager


def test_runner_rows_carry_the_weights_hash_and_new_weights_are_a_new_model(
    tmp_path: Path, narrow: None, pm: pluggy.PluginManager
) -> None:
    folder = tmp_path / "models" / "cifar10" / "corruptions"
    single = release(seeded(zoo()[LRR]["model"], 6), folder / f"{LRR}.pt")
    members = [release(m, folder / f"{DECK}.pt_m{i}.pt") for i, m in enumerate(seeded(zoo()[DECK]["model"], 7).models)]
    manifest = tmp_path / "manifest.json"
    deck_files = {f"{DECK}.pt_m{i}.pt": h for i, h in enumerate(members)}
    entries = {f"cifar10/corruptions/{LRR}": {f"{LRR}.pt": single}, f"cifar10/corruptions/{DECK}": deck_files}
    write_manifest(manifest, entries)
    params = {"threat_model": "corruptions", "dataset": "cifar10", "model_dir": str(tmp_path / "models")}

    def evaluate(name: str, cache: str = "cache") -> pd.DataFrame:
        benchmark = robench.Benchmark(
            name="rb",
            datasets=("cifar-shaped",),  # a CIFAR-10-shaped dataset of one's own: -D dataset=cifar10
            archs=("tinynet", "cnn8"),  # robustbench brings its own network: one model whatever --arch says
            defenses=tuple(
                robench.PluginSpec.of("robustbench", {"model_name": m, **params, "manifest": str(manifest)})
                for m in (LRR, DECK)
            ),
            attacks=(robench.PluginSpec.of("pgd", {"steps": 2}),),
            eps=(8 / 255,),
            n_samples=8,
            batch_size=8,
        )
        summary = run(benchmark, pm=pm, run_dir=tmp_path / name, cache_dir=tmp_path / cache, device="cpu")
        cells = RunStore(summary.run_dir).read_cells()
        return cells.set_index(cells["defense_params"].map(lambda p: json.loads(p)["model_name"]))

    first = evaluate("first")
    assert len(first) == 2 and (first["status"] == "ok").all(), first[["error", "checks"]]
    assert (first["checks"] == "ok").all(), first["checks"]
    assert first.loc[LRR, "arch"] == "WideResNet-18-2" and first.loc[DECK, "arch"] == "WideResNet-18-2 x6"
    assert first.loc[LRR, "cell_id"].startswith("cifar-shaped/WideResNet-18-2/robustbench[")
    published = leaderboard()[f"cifar10/corruptions/{LRR}"]  # beside robench's numbers, in every row
    assert first.loc[LRR, "reference_clean_acc"] == published.clean_acc / 100 == 0.9666
    assert first.loc[LRR, "reference_robust_acc"] == published.robust_acc / 100  # type: ignore[operator]
    assert first.loc[LRR, "reference_source"].startswith(f"RobustBench model_info cifar10/corruptions/{LRR} @78fcc9e4")
    assert not first["reference_followed"].any() and not first["flag_above_reference"].any()  # pgd is not it
    assert not first["flag_probability_outputs"].any()  # the deck presents log-probabilities
    assert first.loc[LRR, "weights_sha256"] == single and first.loc[DECK, "weights_sha256"] == ",".join(members)
    assert json.loads(first.loc[LRR, "defense_params"])["sha256"] == single

    release(seeded(zoo()[LRR]["model"], 8), folder / f"{LRR}.pt")  # new weights under the same name
    served = evaluate("stale-file")  # from robench's model cache: exactly the pinned weights, and it says so
    assert (served["build_seconds"] == 0).all() and served.loc[LRR, "weights_sha256"] == single
    fresh = evaluate("fresh", cache="other-cache")  # read afresh, the file fails its pin
    assert fresh.loc[LRR, "status"] == "error" and "has the wrong sha256" in fresh.loc[LRR, "error"]

    newer = hashlib.sha256((folder / f"{LRR}.pt").read_bytes()).hexdigest()
    manifest.write_text(manifest.read_text().replace(single, newer))  # the new weights pinned: a new model key
    repinned = evaluate("repinned")
    assert repinned.loc[LRR, "build_seconds"] > 0 and repinned.loc[LRR, "weights_sha256"] == newer
    assert repinned.loc[LRR, "model_hash"] != first.loc[LRR, "model_hash"]
    assert repinned.loc[DECK, "model_hash"] == first.loc[DECK, "model_hash"]
