"""The common-corruption threat model: the 15 corruptions, the ``corruptions`` protocol through the
runner, its cache, the released CIFAR-10-C loader, the cells columns, check and report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pluggy
import pytest
import torch
from test_runner import run_tiny

import robench
from robench import STANDARD_CORRUPTIONS, DataShape, ImageData, derive_key, sample_keys
from robench.context import Threat
from robench.discover.manager import get_plugin_manager
from robench.errors import DataNotFoundError
from robench.execute.corruption import CORRUPTION_COLUMNS, CorruptionCache, corrupted_set, load_released
from robench.execute.engine import Setup
from robench.execute.versions import Version
from robench.plugin import PluginSpec
from robench.plugins.corruptions import StandardCorruption
from robench.plugins.corruptions.params import CIFAR32, GREY28, params
from robench.protocol import CLEAN_SOURCE, AttackUse
from robench.results.check import check
from robench.results.report import write_report
from robench.results.storage import CELL_SCHEMA, RunStore
from robench.testing import TinyDataset, TinyPlugin, tiny_data

THREAT = Threat("corruption", 0.0)
SHAPE28 = DataShape(channels=1, height=28, width=28, num_classes=4, mean=(0.5,), std=(0.25,))


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish images with structure (a blurred random field), on the uint8 grid like real data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, channels, 7, 7, generator=g), size=size, mode="bilinear")
    return x.mul(255).round().div(255)


def corrupt(name: str, severity: int, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return StandardCorruption(corruption=name, severity=severity).perturb(
        torch.nn.Identity(), x, x[:, 0, 0, 0], THREAT, keys
    )


@pytest.mark.parametrize("name", STANDARD_CORRUPTIONS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_severity_zero_is_the_identity_and_one_is_not(name: str, channels: int, size: int) -> None:
    x = _images(6, channels, size)
    keys = sample_keys(derive_key("t"), torch.arange(6))
    assert torch.equal(corrupt(name, 0, x, keys), x)
    first = corrupt(name, 1, x, keys)
    assert first.shape == x.shape and float(first.min()) >= 0 and float(first.max()) <= 1
    assert float((first - x).abs().max()) > 1 / 255, f"{name} at severity 1 left the images unchanged"


@pytest.mark.parametrize("name", STANDARD_CORRUPTIONS)
def test_corruptions_are_identical_for_the_same_keys_whatever_the_batch(name: str) -> None:
    x = _images(10, 1, 28, seed=1)
    keys = sample_keys(derive_key("corruptions", "tiny"), torch.arange(100, 110))
    whole = corrupt(name, 4, x, keys)
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])  # other batches, other order
    parts = torch.cat(
        [corrupt(name, 4, x[order[:3]], keys[order[:3]]), corrupt(name, 4, x[order[3:]], keys[order[3:]])]
    )
    assert torch.equal(parts, whole[order])
    if name not in {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}:
        other = corrupt(name, 4, x, keys + 1)  # random corruptions: the draws do come from the keys
        assert not torch.equal(other, whole), f"{name} ignores its keys"


def test_the_28px_table_scales_pixel_parameters_and_keeps_the_rest() -> None:
    assert GREY28["gaussian_noise"] == CIFAR32["gaussian_noise"] and GREY28["contrast"] == CIFAR32["contrast"]
    assert [r for r, _ in GREY28["motion_blur"]] == [5, 5, 5, 7, 8]
    assert GREY28["defocus_blur"][4] == (1.3125, 0.0875)
    assert GREY28["elastic_transform"][0] == pytest.approx((0, 0, 28 * 0.08))
    assert params("snow", 5, 32, 3) == CIFAR32["snow"][4]
    with pytest.raises(Exception, match="28x28 grey"):
        params("fog", 1, 64, 3)


@pytest.fixture(scope="module")
def fashion() -> tuple[ImageData, ImageData]:
    from robench.plugins.fashion_mnist import FashionMNIST

    try:
        return FashionMNIST().load("train"), FashionMNIST().load("test")
    except DataNotFoundError as exc:  # pragma: no cover - the CI machines carry it
        pytest.skip(str(exc))


def test_accuracy_falls_with_severity_on_a_trained_model(fashion: tuple[ImageData, ImageData]) -> None:
    train, test = fashion
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 49, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for start in range(0, 8000, 64):
        x, y = train.batch(torch.arange(start, start + 64))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = test.batch(torch.arange(300))
    keys = sample_keys(derive_key("severity-test"), torch.arange(300))

    def acc(z: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(z).argmax(1) == y).float().mean())

    clean = acc(x)
    by_severity = {s: [acc(corrupt(name, s, x, keys)) for name in STANDARD_CORRUPTIONS] for s in (1, 3, 5)}
    means = [clean, *(float(np.mean(v)) for v in by_severity.values())]
    assert clean > 0.75
    assert means[0] > means[1] > means[2] > means[3] + 0.05, means
    assert sum(a < clean for a in by_severity[5]) >= 12, by_severity[5]  # nearly every corruption hurts at 5


@dataclass(frozen=True, kw_only=True)
class Tiny28(TinyDataset):
    """The tiny synthetic task at Fashion-MNIST's image size (corruption parameters exist for it)."""

    name: ClassVar[str] = "tiny28"
    shape: ClassVar[DataShape] = SHAPE28

    def load(self, split: Any) -> ImageData:
        """256 training or 60 test images."""
        return tiny_data(256, SHAPE28, seed=1) if split == "train" else tiny_data(60, SHAPE28, seed=2)


class Tiny28Plugin:
    @robench.hookimpl
    def robench_datasets(self) -> list[type[TinyDataset]]:
        return [Tiny28]


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    manager.register(Tiny28Plugin(), name="tiny28")
    return manager


PROTOCOL = PluginSpec.of("corruptions", {"corruptions": ("gaussian_noise", "contrast", "fog"), "severities": (1, 5)})
DEFENSES = (
    PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}),
    PluginSpec.of("baseline", {"epochs": 2, "lr": 0.05, "momentum": 0.9}),
)


def run_corruptions(pm: pluggy.PluginManager, tmp: Path, name: str, defenses: tuple[PluginSpec, ...]) -> Any:
    return run_tiny(
        pm, tmp, name, datasets=("tiny28",), defenses=defenses, attacks=(), protocols=(PROTOCOL,), n_samples=40
    )


def _table(summary: Any) -> pd.DataFrame:
    return RunStore(summary.run_dir).read_cells().sort_values("cell_id").reset_index(drop=True)


def test_corruption_cells_through_the_runner_cache_columns_check_report(
    pm: pluggy.PluginManager, tmp_path: Path
) -> None:
    first = run_corruptions(pm, tmp_path, "a", DEFENSES[:1])
    files = sorted((tmp_path / "cache" / "corruptions").glob("*.pt"))
    assert len(files) == 3 * 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = run_corruptions(pm, tmp_path, "b", DEFENSES[1:])  # another defense: sets from the cache
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    a, b = _table(first), _table(second)
    assert a.loc[0, "transfer_sets"] == b.loc[0, "transfer_sets"]
    row = a.iloc[0]
    assert row["status"] == "ok" and row["norm"] == "corruption" and row["eps"] == 0 and row["n_versions"] == 6
    assert row["exhaustive"] and not row["transfer"] and not row["flag_vanishing_gradients"]
    assert np.isnan(row["check_vanishing_share"])
    assert set(CORRUPTION_COLUMNS) <= set(CELL_SCHEMA.names)
    samples = RunStore(first.run_dir).read_samples()
    assert len(samples) == 40 * 7  # clean + every set on every sample
    per_set = samples[samples["version"] >= 0].groupby("version")["correct"].mean()
    assert row["robust_acc"] == pytest.approx(per_set.mean()) == pytest.approx(row["corruption_acc"])
    table = json.loads(row["corruption_table"])
    assert sorted(table) == ["contrast", "fog", "gaussian_noise"] and all(len(v) == 2 for v in table.values())
    assert row["corruption_worst"] in table and row["corruption_worst_acc"] == pytest.approx(
        min(map(np.mean, table.values()))
    )
    assert row["corruption_s1_acc"] == pytest.approx(np.mean([v[0] for v in table.values()]))
    assert pd.isna(row["corruption_s3_acc"])  # not in this protocol
    assert row["robust_ci_low"] <= row["robust_acc"] <= row["robust_ci_high"]

    verdicts = check(first.run_dir, first.run_dir).cells
    assert [(c.verdict, c.test) for c in verdicts] == [("ok", "paired-t")]
    written = write_report(first.run_dir, tmp_path / "report")
    names = {p.name for p in written}
    assert {"accuracy-vs-severity-corruptions.png", "corruption-heatmap-corruptions.png"} <= names
    assert all(p.stat().st_size > 5000 for p in written if p.suffix == ".png")
    assert "common corruptions" in (tmp_path / "report" / "report.md").read_text()


def test_a_tampered_corruption_set_is_rejected_and_regenerated(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    first = run_corruptions(pm, tmp_path, "a", DEFENSES[:1])
    path = sorted((tmp_path / "cache" / "corruptions").glob("*.pt"))[0]
    stored = torch.load(path, weights_only=True)
    original = stored["images"].clone()
    stored["images"][0, 0, 0, 0] ^= 0xFF  # one pixel changed, key and hash kept
    torch.save(stored, path)
    cache = CorruptionCache(tmp_path / "cache")
    assert cache.get({"x": 1}, tuple(original.shape)) is None
    second = run_corruptions(pm, tmp_path, "b", DEFENSES[:1])
    assert torch.equal(torch.load(path, weights_only=True)["images"], original)  # regenerated, identical
    measured = ["robust_acc", "clean_acc", "corruption_table"]
    pd.testing.assert_frame_equal(_table(first)[measured], _table(second)[measured])


def test_a_corruption_protocol_gets_one_cell_at_eps_0_beside_the_eps_grid(pm: pluggy.PluginManager) -> None:
    from test_runner import tiny_benchmark

    from robench.discover.registry import Registries
    from robench.plan.grid import plan

    bench = tiny_benchmark(datasets=("tiny28",), protocols=(PROTOCOL,), eps=(0.1, 0.2))
    cells = plan(bench, Registries.collect(pm))
    assert sorted((c.norm, c.eps) for c in cells) == [("corruption", 0.0), ("linf", 0.1), ("linf", 0.2)]


def _released(tmp: Path, labels: np.ndarray, name: str = "fog") -> tuple[Path, np.ndarray]:
    folder = tmp / "CIFAR-10-C"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5 * len(labels), 32, 32, 3), dtype=np.uint8)
    np.save(folder / f"{name}.npy", images)
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))  # the release stores uint8 labels
    return folder, images


def test_released_cifar10c_arrays_are_used_for_the_evaluated_indices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = np.arange(8) % 10
    folder, images = _released(tmp_path, labels)
    indices = torch.tensor([6, 1, 3])
    got = load_released(folder, "fog", 4, indices, torch.from_numpy(labels).long())
    expected = torch.from_numpy(images[3 * 8 + indices.numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(got, expected)
    with pytest.raises(DataNotFoundError, match="does not match"):
        load_released(folder, "fog", 4, indices, torch.from_numpy((labels + 1) % 10).long())
    with pytest.raises(DataNotFoundError, match=r"no snow\.npy"):
        load_released(folder, "snow", 1, indices, torch.from_numpy(labels).long())

    monkeypatch.setenv("ROBENCH_DATA", str(tmp_path))  # the cell's path: the folder wins over generation
    data = ImageData(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.from_numpy(labels).long())
    use = AttackUse(PluginSpec.of("corruption", {"corruption": "fog", "severity": 2}), CLEAN_SOURCE)
    version = Version(0, use, StandardCorruption(corruption="fog", severity=2), 0)
    source = SimpleNamespace(
        session=SimpleNamespace(transfer_cache=SimpleNamespace(root=tmp_path / "cache" / "transfer"), progress=None),
        cell=SimpleNamespace(model=SimpleNamespace(dataset="cifar10")),
        data=data, indices=indices, setup=Setup("k", 4, torch.device("cpu"), True), seconds=0.0, used=[],
    )  # fmt: skip
    x = corrupted_set(source, version)  # type: ignore[arg-type]
    assert torch.equal(x, torch.from_numpy(images[8 + indices.numpy()]).permute(0, 3, 1, 2).float() / 255)
    assert source.used == ["CIFAR-10-C/fog.npy#2"] and not (tmp_path / "cache" / "corruptions").exists()
