"""``robench check``: real regressions fail, noise passes, bad input says why (DESIGN.md §1 use 4, §5).

The runs are tiny synthetic ones (``robench.testing.TinyPlugin``). A "code version" of a
third-party defense is a class registered under the same name and with the same parameters
as the baseline's, so the cells pair exactly as in a defense repository's CI after a change:
one version trains fewer epochs (a real regression), another only shifts its training seed
(noise).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pluggy
import pytest
from conftest import Shell
from scipy import stats
from torch import nn

import robench
from robench.discover.manager import get_plugin_manager
from robench.execute.numerics import cpu_capability as robench_cpu_capability
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.check import KEY_COLUMNS, RunFolderError, check, load_run, mcnemar_p, two_proportion_p
from robench.results.storage import SCHEMA_VERSION, CellResult, RunStore
from robench.testing import TinyPlugin
from robench.training import Schedule, train


def code_version(epochs: int = 3, seed_shift: int = 0, crash: bool = False) -> type[robench.Defense]:
    """The ``guarded`` defense as one version of its code would build it."""

    @dataclass(frozen=True, kw_only=True)
    class Guarded(robench.Defense):
        """A third party's defense under CI: same name and parameters in every version."""

        name: ClassVar[str] = "guarded"
        lr: float = 0.05

        def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
            if crash:
                raise RuntimeError("out of cheese")
            ctx = dataclasses.replace(ctx, seed=ctx.seed + seed_shift)
            schedule = Schedule(epochs=epochs, batch_size=64, lr=self.lr, momentum=0.9)
            return {"model": train(ctx.new_model(), ctx, schedule, desc="guarded")}

    return Guarded


class _Provides:
    def __init__(self, defense: type[robench.Defense]) -> None:
        self.defense = defense

    @robench.hookimpl
    def robench_defenses(self) -> list[type[robench.Defense]]:
        return [self.defense]


def tiny_run(tmp: Path, name: str, defense: type[robench.Defense], **overrides: Any) -> Path:
    """Run the guarded defense on the tiny dataset with a fresh plugin manager and a fresh cache."""
    pm: pluggy.PluginManager = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    pm.register(_Provides(defense), name="guarded")
    values: dict[str, Any] = dict(
        name=name,
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("guarded"),),
        attacks=(PluginSpec.of("pgd", {"steps": 5, "restarts": 2}),),
        eps=(0.2, 0.23),
        n_samples=96,
        batch_size=48,
    )
    values.update(overrides)
    run(Benchmark(**values), pm=pm, run_dir=tmp / name, cache_dir=tmp / f"{name}-cache", device="cpu")
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The baseline, a regressed version (1 epoch instead of 3), a noisy one (another seed), a crashing one.

    The tiny model's robustness really depends on its training seed (seeds 2 and 3 give models
    7-16 points less robust at eps 0.23, and the paired test rightly calls those models worse);
    seed shift 6 gives a model within a few samples of the baseline's: noise, to pass.
    """
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "base": tiny_run(tmp, "base", code_version()),
        "regressed": tiny_run(tmp, "regressed", code_version(epochs=1)),
        "noise": tiny_run(tmp, "noise", code_version(seed_shift=6)),
        "crashed": tiny_run(tmp, "crashed", code_version(crash=True)),
    }


def copy_run(src: Path, dst: Path) -> RunStore:
    shutil.copytree(src, dst)
    return RunStore(dst)


# -- the statistics ----------------------------------------------------------------------


def test_mcnemar_uses_only_the_discordant_pairs() -> None:
    base = np.array([True] * 90 + [False] * 10)
    assert mcnemar_p(base, base) == (1.0, 1.0)
    worse = base.copy()
    worse[:10] = False  # 10 losses, no gains: p = 2**-10
    assert mcnemar_p(base, worse)[0] == pytest.approx(0.5**10)
    swapped = worse.copy()
    swapped[90:] = True  # 10 losses and 10 gains: no evidence either way
    assert mcnemar_p(base, swapped)[0] == pytest.approx(stats.binomtest(10, 20, 0.5, alternative="greater").pvalue)
    assert mcnemar_p(base, swapped)[0] > 0.5


def test_two_proportion_z_test() -> None:
    drop, rise = two_proportion_p(0.9, 1000, 0.8, 1000)
    pooled = 0.85
    z = 0.1 / np.sqrt(pooled * (1 - pooled) * 2 / 1000)
    assert drop == pytest.approx(stats.norm.sf(z)) and drop < 1e-9 and rise > 0.99
    assert two_proportion_p(1.0, 50, 1.0, 50) == (1.0, 1.0)


# -- verdicts on real (tiny) runs --------------------------------------------------------


def test_a_run_compared_with_itself_passes(runs: dict[str, Path], shell: Shell) -> None:
    code, out = shell(["check", str(runs["base"]), "--baseline", str(runs["base"])])
    assert code == 0, out
    assert out.rstrip().endswith("check: 2 passed, 0 failed")
    assert {c.verdict for c in check(runs["base"], runs["base"]).cells} == {"ok"}


def test_a_weakened_defense_is_caught(runs: dict[str, Path], shell: Shell) -> None:
    result = check(runs["regressed"], runs["base"])
    assert result.exit_code == 1 and result.count("regressed") >= 1
    cell = next(c for c in result.cells if c.verdict == "regressed")
    assert cell.test == "mcnemar" and cell.robust is not None and cell.robust.delta_points < -1
    code, out = shell(["check", str(runs["regressed"]), "--baseline", str(runs["base"])])
    assert code == 1 and "regressed: robust accuracy dropped" in out
    # the same drop is accepted by a tolerance wider than it
    assert check(runs["regressed"], runs["base"], tolerance=60).exit_code == 0


def test_seed_level_noise_is_not_flagged(runs: dict[str, Path]) -> None:
    result = check(runs["noise"], runs["base"])
    deltas = [c.robust.delta_points for c in result.cells if c.robust is not None]
    assert min(deltas) < -1 and all(abs(d) <= 4 * 100 / 96 for d in deltas)  # drops of a few samples
    assert result.exit_code == 0, [(c.cell_id, c.verdict, c.robust) for c in result.cells]


def test_mcnemar_when_the_same_samples_were_scored_else_z(runs: dict[str, Path], tmp_path: Path) -> None:
    assert {c.test for c in check(runs["regressed"], runs["base"]).cells} == {"mcnemar"}
    store = copy_run(runs["base"], tmp_path / "no-samples")
    shutil.rmtree(store.path / "samples")  # e.g. a baseline committed without its samples table
    result = check(runs["regressed"], store.path)
    assert {c.test for c in result.cells} == {"z"} and result.count("regressed") >= 1
    other = copy_run(runs["base"], tmp_path / "other-samples")
    samples = other.read_samples()
    samples["sample"] += 1000  # same cells, other sample indices: not paired
    rows = RunStore(runs["base"]).read_cells().set_index("cell_key", drop=False)
    for key, group in samples.groupby("cell_key"):
        other.write(CellResult(rows.loc[key].to_dict(), group.to_dict("list")))
    assert {c.test for c in check(runs["base"], other.path).cells} == {"z"}


def test_missing_new_and_failed_cells_are_reported(runs: dict[str, Path], tmp_path: Path, shell: Shell) -> None:
    partial = copy_run(runs["base"], tmp_path / "partial")
    cells = partial.read_cells().sort_values("cell_id")
    (partial.path / "cells" / f"{cells.iloc[0]['cell_key']}.parquet").unlink()
    missing = check(partial.path, runs["base"])
    assert missing.exit_code == 1 and [c.verdict for c in missing.cells] == ["missing", "ok"]
    new = check(runs["base"], partial.path)
    assert new.exit_code == 0 and sorted(c.verdict for c in new.cells) == ["new", "ok"]
    # failed cells store no n, yet pair with their ok counterparts, both ways round
    code, out = shell(["check", str(runs["crashed"]), "--baseline", str(runs["base"])])
    assert code == 1 and out.count("failed: run cell failed: guarded.build: RuntimeError: out of cheese") == 2
    assert [c.verdict for c in check(runs["base"], runs["crashed"]).cells] == ["failed", "failed"]


def test_changed_parameters_are_missing_cells_that_name_the_column(runs: dict[str, Path], tmp_path: Path) -> None:
    changed = copy_run(runs["base"], tmp_path / "changed")
    table = changed.read_cells()
    table["defense_params"] = table["defense_params"].str.replace("0.05", "0.04")
    changed.rewrite_cells(table)
    with pytest.raises(RunFolderError, match=r"no cells in common.*differs .* in defense_params"):
        check(changed.path, runs["base"])


def test_a_new_default_eot_keeps_deterministic_cells_paired(runs: dict[str, Path], tmp_path: Path) -> None:
    # eot and votes cannot move a deterministic model's numbers: a baseline stored under another
    # default EOT still pairs; a randomized cell under other EOT settings is another cell
    other = copy_run(runs["base"], tmp_path / "other-eot")
    table = other.read_cells()
    table["protocol_spec"] = table["protocol_spec"].str.replace('"eot":', '"eot":9', regex=False)
    other.rewrite_cells(table)
    assert {c.verdict for c in check(other.path, runs["base"]).cells} == {"ok"}
    table["randomized"] = True
    other.rewrite_cells(table)
    with pytest.raises(RunFolderError, match=r"no cells in common.*protocol_spec"):
        check(other.path, runs["base"])


def test_unusable_input_exits_2_with_the_reason(runs: dict[str, Path], tmp_path: Path, shell: Shell) -> None:
    code, out = shell(["check", str(tmp_path), "--baseline", str(runs["base"])])
    assert code == 2 and "is not a robench run folder" in out
    old = copy_run(runs["base"], tmp_path / "old")
    table = old.read_cells()
    table["schema_version"] = 0
    old.rewrite_cells(table)
    (old.path / "manifest.json").unlink()
    code, out = shell(["check", str(runs["base"]), "--baseline", str(old.path)])
    assert code == 2 and f"results schema version 0, this robench reads version {SCHEMA_VERSION}" in out
    manifest = copy_run(runs["base"], tmp_path / "manifest")
    data = json.loads((manifest.path / "manifest.json").read_text())
    (manifest.path / "manifest.json").write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(RunFolderError, match=f"schema version {SCHEMA_VERSION + 1}"):
        load_run(manifest.path)
    code, out = shell(["check", str(runs["base"]), "--baseline", str(runs["base"]), "--json", "--markdown"])
    assert code == 2 and "alternatives" in out


def test_json_and_markdown_outputs(runs: dict[str, Path], shell: Shell) -> None:
    args = ["check", str(runs["regressed"]), "--baseline", str(runs["base"])]
    code, out = shell([*args, "--json"])
    data = json.loads(out)
    assert code == 1 and data["passed"] is False and data["key_columns"] == list(KEY_COLUMNS)
    verdicts = {c["verdict"] for c in data["cells"]}
    assert "regressed" in verdicts and all(c["test"] == "mcnemar" for c in data["cells"])
    assert all(0 <= c["robust"]["p_drop"] <= 1 for c in data["cells"])
    code, out = shell([*args, "--markdown", "--alpha", "0.01"])
    assert code == 1 and out.startswith("### \u274c robench check FAILED")
    assert "| cell | robust % (baseline \u2192 run) |" in out and "p < 0.01" in out


def test_a_baseline_from_another_cpu_is_named(runs: dict[str, Path], tmp_path: Path, shell: Shell) -> None:
    """Rows record the CPU capability; check says when the baseline's differs from the run's."""
    run_cells = RunStore(runs["base"]).read_cells()
    assert set(run_cells["cpu_capability"]) == {robench_cpu_capability()}
    assert (run_cells["threads"] >= 1).all() and set(run_cells["quantized_engine"]) == {""}
    store = copy_run(runs["base"], tmp_path / "other-cpu")
    table = store.read_cells()
    table["cpu_capability"] = "AVX512_FAKE"
    store.rewrite_cells(table)
    result = check(runs["base"], tmp_path / "other-cpu")
    assert result.passed and len(result.notes) == 2 and "float kernels differ" in result.notes[1]
    assert result.notes[0] == f"CPU capability: baseline AVX512_FAKE, run {robench_cpu_capability()}"
    code, out = shell(["check", str(runs["base"]), "--baseline", str(tmp_path / "other-cpu")])
    assert code == 0 and "note: CPU capability: baseline AVX512_FAKE" in out, out
    assert check(runs["base"], runs["base"]).notes == ()


def test_a_rise_fails_only_with_fail_on_rise(runs: dict[str, Path], shell: Shell) -> None:
    """The better model checked against the worse one: improved, which passes, unless the
    check is of stored models re-evaluated, where a rise means a weaker attack."""
    result = check(runs["base"], runs["regressed"])
    assert result.count("improved") >= 1 and result.passed
    strict = check(runs["base"], runs["regressed"], fail_on_rise=True)
    assert not strict.passed and strict.exit_code == 1
    code, out = shell(["check", str(runs["base"]), "--baseline", str(runs["regressed"]), "--fail-on-rise"])
    assert code == 1 and "improved: robust accuracy rose" in out, out
    assert out.rstrip().endswith(f"check: {strict.count('ok')} passed, {strict.count('improved')} failed")
