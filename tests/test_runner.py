"""Runner semantics users must be able to trust (DESIGN.md §5, §7), on tiny synthetic data."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
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
from robench.errors import CacheError
from robench.execute.runner import Summary, run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore
from robench.testing import TinyPlugin

MEASURED = ["cell_id", "n", "clean_acc", "robust_acc", "robust_ci_low", "robust_ci_high", "n_versions"]


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    return manager


def tiny_benchmark(**overrides: Any) -> Benchmark:
    values: dict[str, Any] = dict(
        name="tiny",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}),),
        attacks=(PluginSpec.of("pgd", {"steps": 5, "restarts": 3}),),
        eps=(0.2, 0.23),
        n_samples=80,
        batch_size=32,
    )
    values.update(overrides)
    return Benchmark(**values)


def run_tiny(pm: pluggy.PluginManager, tmp: Path, name: str = "run", **overrides: Any) -> Summary:
    return run(tiny_benchmark(**overrides), pm=pm, run_dir=tmp / name, cache_dir=tmp / "cache", device="cpu")


def cells(summary: Summary) -> pd.DataFrame:
    return RunStore(summary.run_dir).read_cells().sort_values("cell_id").reset_index(drop=True)


def robust_samples(summary: Summary) -> pd.Series:
    """Per (cell, sample): robust iff every stored outcome is correct."""
    samples = RunStore(summary.run_dir).read_samples()
    return samples.groupby(["cell_key", "sample"])["correct"].all().sort_index()


def test_early_exit_gives_exactly_the_exhaustive_accuracy(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    fast = run_tiny(pm, tmp_path, "fast")
    full = run_tiny(pm, tmp_path, "full", exhaustive=True)
    pd.testing.assert_frame_equal(cells(fast)[MEASURED], cells(full)[MEASURED])
    assert 0 < cells(fast)["robust_acc"].min() < cells(fast)["clean_acc"].max()  # the attack did something
    pd.testing.assert_series_equal(robust_samples(fast), robust_samples(full))
    # exhaustive mode fills every version for every sample; early exit skips some
    n_full, n_fast = len(RunStore(full.run_dir).read_samples()), len(RunStore(fast.run_dir).read_samples())
    assert n_full == 2 * 80 * (1 + 3) and n_fast < n_full
    assert cells(fast)["gradient_calls"].sum() < cells(full)["gradient_calls"].sum()


def test_same_seed_same_table_and_batch_size_does_not_matter(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    first = run_tiny(pm, tmp_path, "a")
    again = run_tiny(pm, tmp_path, "b", batch_size=7)
    pd.testing.assert_frame_equal(cells(first)[MEASURED], cells(again)[MEASURED])
    pd.testing.assert_series_equal(robust_samples(first), robust_samples(again))


def test_a_different_seed_trains_a_different_model(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    zero = cells(run_tiny(pm, tmp_path, "s0"))
    one = cells(run_tiny(pm, tmp_path, "s1", seeds=(1,)))
    assert set(zero["model_hash"]).isdisjoint(set(one["model_hash"]))


def test_rerun_skips_finished_cells_and_reuses_the_model(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    first = run_tiny(pm, tmp_path)
    assert first.skipped == 0 and cells(first)["build_seconds"].max() > 0
    second = run_tiny(pm, tmp_path)
    assert second.skipped == 2
    bigger = run_tiny(pm, tmp_path, eps=(0.2, 0.23, 0.25))  # a grown grid: one new cell
    assert bigger.skipped == 2
    table = cells(bigger)
    assert len(table) == 3 and table.loc[table["eps"] == 0.25, "build_seconds"].item() == 0.0  # model from cache


class _Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing in robench swallows it."""


class _CrashAfter:
    def __init__(self, n: int) -> None:
        self.n = n

    @robench.hookimpl
    def robench_cell_finish(self, cell: Any, result: Any) -> None:
        self.n -= 1
        if self.n == 0:
            raise _Crash


def test_resume_after_a_crash_gives_the_uninterrupted_table(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    eps = (0.18, 0.2, 0.22, 0.24)
    reference = run_tiny(pm, tmp_path, "reference", eps=eps)
    pm.register(_CrashAfter(2), name="crash")
    with pytest.raises(_Crash):
        run_tiny(pm, tmp_path, "crashed", eps=eps)
    pm.unregister(name="crash")
    assert len(RunStore(tmp_path / "crashed").read_cells()) == 2  # finished cells survived the crash
    resumed = run_tiny(pm, tmp_path, "crashed", eps=eps)
    assert resumed.skipped == 2
    pd.testing.assert_frame_equal(cells(reference)[MEASURED], cells(resumed)[MEASURED])


def test_atomic_write_leaves_no_half_file(
    pm: pluggy.PluginManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    first = run_tiny(pm, tmp_path, eps=(0.2,))
    before = sorted(p.name for p in (first.run_dir / "cells").iterdir())
    real_write = pq.write_table

    def write_half(table: Any, where: Any, **kwargs: Any) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half)
    with pytest.raises(OSError, match="disk full"):
        run_tiny(pm, tmp_path, eps=(0.2, 0.23))
    monkeypatch.setattr(pq, "write_table", real_write)
    assert sorted(p.name for p in (first.run_dir / "cells").iterdir()) == before  # no temp file left either
    assert len(RunStore(first.run_dir).read_cells()) == 1


@dataclass(frozen=True, kw_only=True)
class Exploding(robench.Defense):
    """A defense whose build always fails."""

    name: ClassVar[str] = "exploding"

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        raise RuntimeError("out of cheese")


class _ExplodingPlugin:
    @robench.hookimpl
    def robench_defenses(self) -> list[type[robench.Defense]]:
        return [Exploding]


def test_a_failing_plugin_gives_error_rows_and_the_grid_goes_on(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    pm.register(_ExplodingPlugin(), name="exploding")
    summary = run_tiny(pm, tmp_path, defenses=(PluginSpec.of("exploding"), PluginSpec.of("baseline", {"epochs": 1})))
    table = cells(summary)
    assert list(table["status"]) == ["ok", "ok", "error", "error"]  # sorted by id: baseline first
    assert all("out of cheese" in e for e in table.loc[table["status"] == "error", "error"])
    assert len(summary.failed) == 2


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @robench.hookimpl
    def robench_configure(self, benchmark: Benchmark) -> None:
        self.calls.append("configure")

    @robench.hookimpl
    def robench_modify_plan(self, benchmark: Benchmark, cells: list[Any]) -> None:
        self.calls.append(f"modify_plan:{len(cells)}")

    @robench.hookimpl
    def robench_cell_start(self, cell: Any) -> None:
        self.calls.append("cell_start")

    @robench.hookimpl
    def robench_cell_finish(self, cell: Any, result: Any) -> None:
        self.calls.append(f"cell_finish:{result.status}")

    @robench.hookimpl
    def robench_session_finish(self, benchmark: Benchmark, results: Sequence[Any]) -> None:
        self.calls.append(f"session_finish:{len(results)}")


def test_session_hooks_are_called_in_order(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    recorder = _Recorder()
    pm.register(recorder, name="recorder")
    run_tiny(pm, tmp_path)
    assert recorder.calls == [
        "configure",
        "modify_plan:2",
        "cell_start",
        "cell_finish:ok",
        "cell_start",
        "cell_finish:ok",
        "session_finish:2",
    ]


def test_modify_plan_can_filter_cells(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    class OnlySmallEps:
        @robench.hookimpl
        def robench_modify_plan(self, benchmark: Benchmark, cells: list[Any]) -> None:
            cells[:] = [c for c in cells if c.eps < 0.21]

    pm.register(OnlySmallEps(), name="filter")
    assert list(cells(run_tiny(pm, tmp_path))["eps"]) == [0.2]


def test_cached_models_load_with_weights_only(
    pm: pluggy.PluginManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_tiny(pm, tmp_path, "first")
    seen: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    second = run_tiny(pm, tmp_path, "second")
    assert seen == [True] and cells(second)["build_seconds"].max() == 0.0


def test_missing_data_fails_before_any_compute(
    pm: pluggy.PluginManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robench.errors import DataNotFoundError
    from robench.testing import TinyDataset

    def missing(self: Any) -> str:
        raise DataNotFoundError("looked in /nowhere")

    monkeypatch.setattr(TinyDataset, "locate", missing)
    with pytest.raises(DataNotFoundError, match="/nowhere"):
        run_tiny(pm, tmp_path)
    assert not (tmp_path / "cache").exists()


def test_training_does_not_depend_on_the_global_random_state(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    """Same seed, fresh caches, different global generator states: identical weights."""
    weights = []
    for state in (1, 2):
        torch.manual_seed(state)
        torch.rand(state * 10)  # whatever else a process did before
        run_tiny(pm, tmp_path / str(state), eps=(0.2,))
        (path,) = (tmp_path / str(state) / "cache" / "models").glob("*/model.pt")
        weights.append(torch.load(path, weights_only=True))
        assert [p.name for p in path.parent.parent.iterdir()] == [path.parent.name], "no scratch folders left"
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _cached_states(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(cache)): torch.load(p, weights_only=True) for p in sorted(cache.glob("models/*/*.pt"))}


def test_a_build_is_a_function_of_its_key_alone(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    """Same key, bit-identical weights: after a damaged cache entry, after other builds and
    attacks in the same process, and with the groups in another order."""
    advt = PluginSpec.of("advt", {"epochs": 1, "attack_steps": 2})
    defenses = (tiny_benchmark().defenses[0], advt)
    run_tiny(pm, tmp_path, "first", defenses=defenses)
    first = _cached_states(tmp_path / "cache")
    assert len(first) == 2
    for path in (tmp_path / "cache").glob("models/*/*.pt"):
        path.write_bytes(path.read_bytes()[:-64])  # damaged: the sha256 check fails
    torch.rand(1000)  # other work drew from the global generator
    run_tiny(pm, tmp_path, "other", defenses=(PluginSpec.of("baseline", {"epochs": 1, "lr": 0.01}),))
    run_tiny(pm, tmp_path, "again", defenses=defenses[::-1])
    rebuilt = _cached_states(tmp_path / "cache")
    for name, state in first.items():
        assert set(state) == set(rebuilt[name])
        assert all(torch.equal(state[k], rebuilt[name][k]) for k in state), f"{name} was rebuilt differently"
    before = torch.random.get_rng_state()
    run_tiny(pm, tmp_path, "fresh", defenses=(PluginSpec.of("baseline", {"epochs": 2}),))
    assert torch.equal(before, torch.random.get_rng_state()), "a build must not move the global generator"


def test_stored_models_are_evaluated_and_never_built(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    """--models: the same numbers from the stored weights, nothing trained; a model that is
    not stored fails before any compute, naming it."""
    first = run_tiny(pm, tmp_path, "first")
    stored = tmp_path / "stored"
    shutil.copytree(tmp_path / "cache" / "models", stored)
    bench = tiny_benchmark()
    again = run(bench, pm=pm, run_dir=tmp_path / "again", cache_dir=tmp_path / "fresh", device="cpu", models=stored)
    pd.testing.assert_frame_equal(cells(first)[MEASURED], cells(again)[MEASURED])
    assert (cells(again)["build_seconds"] == 0).all()
    assert not (tmp_path / "fresh" / "models").exists(), "nothing may be built or saved"
    other = tiny_benchmark(defenses=(PluginSpec.of("baseline", {"epochs": 1}),))
    with pytest.raises(CacheError, match=r"baseline\[epochs=1\].* is not in"):
        run(other, pm=pm, run_dir=tmp_path / "other", cache_dir=tmp_path / "fresh", device="cpu", models=stored)
    assert not (tmp_path / "other" / "cells").exists()


def test_a_selected_run_into_an_existing_folder_keeps_its_manifest_whole(
    pm: pluggy.PluginManager, tmp_path: Path
) -> None:
    """-k runs that fill one folder in parts: the manifest lists every cell of the folder."""
    bench = tiny_benchmark()
    for select in ("eps=0.2/", "eps=0.23/"):
        run(bench, pm=pm, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu", select=select)
    manifest = RunStore(tmp_path / "run").read_manifest()
    assert sorted(c["id"].split("/")[-2] for c in manifest["cells"]) == ["eps=0.2", "eps=0.23"]
    assert {c["key"] for c in manifest["cells"]} == set(RunStore(tmp_path / "run").read_cells()["cell_key"])


@dataclass(frozen=True, kw_only=True)
class Scripted(robench.Defense):
    """A trained baseline shipped as a TorchScript module (models that take no forward hooks)."""

    name: ClassVar[str] = "scripted"

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        assert ctx.get_models is not None
        (model,) = ctx.get_models("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}).values()
        return {"model": torch.jit.trace(model.eval(), ctx.train.batch(torch.arange(2))[0])}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        return self.fit(ctx)


class _ScriptedPlugin:
    @robench.hookimpl
    def robench_defenses(self) -> list[type[robench.Defense]]:
        return [Scripted]


def test_a_torchscript_variant_is_attacked_and_counted_like_its_module(
    pm: pluggy.PluginManager, tmp_path: Path
) -> None:
    pm.register(_ScriptedPlugin(), name="scripted")
    both = (PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}), PluginSpec("scripted"))
    table = cells(run_tiny(pm, tmp_path, defenses=both)).set_index(["defense", "eps"]).sort_index()
    assert (table["status"] == "ok").all(), table["error"].tolist()
    for column in ["clean_acc", "robust_acc", "gradient_calls", "queries"]:
        assert table.loc["scripted", column].tolist() == table.loc["baseline", column].tolist(), column
    assert table["gradient_calls"].min() > 0
