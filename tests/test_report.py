"""``robench report``: report.md and the PNG plots of a tiny synthetic run."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from matplotlib import image
from torch import nn

import robench
from robench import cli
from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.report import write_report
from robench.results.storage import RunStore
from robench.testing import TinyPlugin
from robench.training import Schedule, train

PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, kw_only=True)
class Family(robench.Defense):
    """Two variants of different sizes, like ProARD's students (for the size plot)."""

    name: ClassVar[str] = "family"

    def variant_names(self) -> tuple[str, ...]:
        return ("small", "large")

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        classes = ctx.shape.num_classes
        large = nn.Sequential(ctx.new_model(), nn.Linear(classes, 256), nn.ReLU(), nn.Linear(256, classes))
        return {"small": ctx.new_model(), "large": large}

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        schedule = Schedule(epochs=2, batch_size=64, lr=0.05, momentum=0.9)
        return {name: train(model, ctx, schedule) for name, model in self.skeletons(ctx).items()}


class _FamilyPlugin:
    @robench.hookimpl
    def robench_defenses(self) -> list[type[robench.Defense]]:
        return [Family]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """baseline (one variant) and family (two) under PGD at three eps."""
    tmp = tmp_path_factory.mktemp("report")
    pm = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    pm.register(_FamilyPlugin(), name="family")
    benchmark = Benchmark(
        name="report",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("baseline", {"epochs": 2, "lr": 0.05, "momentum": 0.9}), PluginSpec.of("family")),
        attacks=(PluginSpec.of("pgd", {"steps": 3, "restarts": 1}),),
        eps=(0.1, 0.2, 0.25),
        n_samples=64,
        batch_size=64,
    )
    run(benchmark, pm=pm, run_dir=tmp / "run", cache_dir=tmp / "cache", device="cpu")
    return tmp / "run"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == PNG
    height, width = image.imread(path).shape[:2]
    assert width > 600 and height > 400


def test_report_writes_markdown_and_plots(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["robench", "report", str(run_dir)])
    cli.main()
    printed = capsys.readouterr().out.split()
    report = run_dir / "report" / "report.md"
    assert printed[0] == str(report)
    eps_plot = run_dir / "report" / "robust-vs-eps-pgd-restarts-1-steps-3.png"
    size_plot = run_dir / "report" / "accuracy-vs-size-pgd-restarts-1-steps-3.png"
    macs_plot = run_dir / "report" / "accuracy-vs-macs-pgd-restarts-1-steps-3.png"  # its variants differ in MACs too
    assert printed[1:] == [str(eps_plot), str(size_plot), str(macs_plot)]
    for plot in (eps_plot, size_plot, macs_plot):
        assert_png(plot)
    text = report.read_text()
    assert "## pgd[restarts=1,steps=3]: tiny, tinynet, linf" in text
    header = next(line for line in text.splitlines() if line.startswith("| defense"))
    assert "| eps 0.1 | eps 0.2 | eps 0.25 |" in header and "| model size | MACs | latency ms |" in header
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and [r.split("|")[2].strip() for r in rows] == ["model", "large", "small"]
    cells = RunStore(run_dir).read_cells()
    first = cells[(cells["defense"] == "baseline") & (cells["eps"] == 0.1)].iloc[0]
    interval = (
        f"{100 * first['robust_acc']:.1f} [{100 * first['robust_ci_low']:.1f}, {100 * first['robust_ci_high']:.1f}]"
    )
    assert interval in rows[0]
    assert f"![robust accuracy against eps]({eps_plot.name})" in text
    assert f"![robust accuracy against MACs]({macs_plot.name})" in text
    assert "## Sanity flags" in text


def test_no_size_plot_without_multi_variant_defenses_and_failed_cells_are_listed(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    store = RunStore(copy)
    cells = store.read_cells()
    for key in cells.loc[cells["defense"] == "family", "cell_key"]:
        (copy / "cells" / f"{key}.parquet").unlink()
    failed = store.read_cells().sort_values("eps").iloc[[0]].copy()
    failed["status"], failed["error"] = "error", "out of cheese"
    store.rewrite_cells(failed)
    written = write_report(copy, tmp_path / "out")
    assert [p.name for p in written] == ["report.md", "robust-vs-eps-pgd-restarts-1-steps-3.png"]
    assert_png(written[1])
    text = written[0].read_text()
    assert "3 cells (1 failed)" in text and "## Failed cells" in text and "out of cheese" in text
    assert not (copy / "report").exists()


def test_sanity_flags_are_listed(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "flagged"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    store = RunStore(copy)
    row = store.read_cells().iloc[[0]].copy()
    row["flag_eps_not_monotonic"] = True
    store.rewrite_cells(row)
    text = write_report(copy)[0].read_text()
    assert f"- `{row.iloc[0]['cell_id']}`: flag_eps_not_monotonic (robust accuracy rises with eps" in text


def test_report_of_a_folder_that_is_no_run_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["robench", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2 and "is not a robench run folder" in capsys.readouterr().err
