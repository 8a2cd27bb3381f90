"""robench as a library: robench.evaluate runs the engine of `robench run` on a model the caller
holds, and robench.read_run reads any run folder back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pluggy
import pytest
import robench_traps
import torch
from torch import nn

import robench
from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore
from robench.testing import TinyPlugin, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
MEASURED = ["n", "clean_acc", "robust_acc", "robust_ci_low", "robust_ci_high", "n_versions", "eps", "checks"]


def _trained_tiny(tmp: Path) -> tuple[nn.Module, pd.DataFrame, pd.DataFrame]:
    """A baseline trained by `robench run` on the tiny dataset, its row and its samples."""
    pm: pluggy.PluginManager = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    benchmark = Benchmark(
        name="tiny",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}),),
        attacks=(PluginSpec.of("pgd", {"steps": 5, "restarts": 2}),),
        eps=(0.2, 0.25),
        n_samples=80,
        batch_size=32,
    )
    run(benchmark, pm=pm, run_dir=tmp / "run", cache_dir=tmp / "cache", device="cpu")
    (weights,) = (tmp / "cache" / "models").glob("*/model.pt")
    model = tiny_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    store = RunStore(tmp / "run")
    return model.eval(), store.read_cells(), store.read_samples()


def test_evaluate_gives_the_numbers_and_verdicts_of_robench_run(tmp_path: Path) -> None:
    model, cells, samples = _trained_tiny(tmp_path)
    got = robench.evaluate(
        model,
        dataset="tiny",
        attack="pgd",
        attack_params={"steps": 5, "restarts": 2},
        eps=[0.2, 0.25],
        n_samples=80,
        batch_size=17,  # another batch size: the numbers must not move
        device="cpu",
        out=tmp_path / "api",
        cache_dir=tmp_path / "cache",
        progress=False,
        plugins=[TinyPlugin()],
    )
    expected = cells.sort_values("eps").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[MEASURED], expected[MEASURED])
    assert 0 < got["robust_acc"].min() < got["clean_acc"].max()  # the attack did something
    assert set(got["defense"]) == {"model"} and (got["status"] == "ok").all()
    mine = robench.read_run(tmp_path / "api", samples=True)
    verdicts = [
        table.assign(eps=table["cell_key"].map(rows.set_index("cell_key")["eps"]))
        .groupby(["eps", "sample"])["correct"]
        .all()
        for table, rows in ((mine, got), (samples, cells))
    ]
    pd.testing.assert_series_equal(verdicts[0], verdicts[1])  # every sample's verdict, at every eps


def test_evaluate_runs_the_model_checks(tmp_path: Path) -> None:
    model = robench_traps.Softmax(tiny_model()).eval()
    got = robench.evaluate(
        model, dataset="tiny", attack="fgsm", eps=0.2, n_samples=32, device="cpu",
        cache_dir=tmp_path / "cache", progress=False, plugins=[TinyPlugin()],
    )  # fmt: skip
    assert got.loc[0, "checks"] == "probability_outputs" and got.loc[0, "flag_probability_outputs"]


def test_evaluate_takes_the_first_n_images_in_order(tmp_path: Path) -> None:
    got = robench.evaluate(
        tiny_model(), dataset="tiny", attack="fgsm", eps=0.2, n_samples=32, sample_order="first", device="cpu",
        out=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, plugins=[TinyPlugin()],
    )  # fmt: skip
    assert got.loc[0, "sample_order"] == "first"
    assert sorted(robench.read_run(tmp_path / "run", samples=True)["sample"].unique()) == list(range(32))


def test_bad_input_fails_before_any_compute(tmp_path: Path) -> None:
    with pytest.raises(robench.ConfigError, match=r"needs a torch\.nn\.Module, got function"):
        robench.evaluate(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(robench.ConfigError, match="attack= or protocol=, not both"):
        robench.evaluate(tiny_model(), attack="pgd", protocol="square")
    with pytest.raises(robench.UnknownPluginError, match="Did you mean: pgd"):
        robench.evaluate(tiny_model(), attack="pgdd", cache_dir=tmp_path, progress=False)
    with pytest.raises(robench.ConfigError, match=r"unknown sample order 'frist'. Did you mean: first"):
        robench.evaluate(tiny_model(), sample_order="frist")
    with pytest.raises(robench.ConfigError, match=r"eps=2\.0 is outside"):
        robench.evaluate(tiny_model(), eps=2.0)
    with pytest.raises(robench.RobenchError, match="is not a robench run folder"):
        robench.read_run(tmp_path)


def test_the_run_folder_is_a_normal_one(tmp_path: Path) -> None:
    robench.evaluate(
        tiny_model(), dataset="tiny", attack="fgsm", eps=0.2, n_samples=32, device="cpu",
        out=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, plugins=[TinyPlugin()],
    )  # fmt: skip
    show = subprocess.run(
        [sys.executable, "-m", "robench", "show", str(tmp_path / "run")], capture_output=True, text=True, check=True
    )
    assert "tiny" in show.stdout and "model" in show.stdout


def test_readme_python_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)[:1]
    assert len(code.strip().splitlines()) <= 10
    env = {**os.environ, "ROBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "robust_acc" in out.stdout and (tmp_path / "results" / "my-model" / "cells").is_dir()
