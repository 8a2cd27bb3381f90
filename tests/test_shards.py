"""Shards (issue 20): a cell's subset evaluated in fixed slices, stored one part at a time.

Keyed attacks on deterministic models give the unsharded numbers at any shard size; a run
killed mid-cell keeps its finished parts and the rerun computes only the missing shards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pluggy
import pytest
import torch
from click.testing import CliRunner
from test_runner import MEASURED, tiny_benchmark

from robench.cli import cli
from robench.discover.manager import get_plugin_manager
from robench.errors import ConfigError
from robench.execute.engine import Outcome
from robench.execute.runner import run
from robench.execute.shards import Part, shard_seed, shard_slices
from robench.plan.benchfile import load_benchmark
from robench.plan.config import DEFAULT_SHARD_SIZE
from robench.plugin import PluginSpec
from robench.results.parts import PartStore
from robench.results.sampling import sampling_notes
from robench.results.storage import RunStore
from robench.testing import TinyPlugin


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    return manager


def _run(pm: pluggy.PluginManager, tmp: Path, name: str, **overrides: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    benchmark = tiny_benchmark(**overrides)
    run(benchmark, pm=pm, run_dir=tmp / name, cache_dir=tmp / "cache", device="cpu")
    store = RunStore(tmp / name)
    cells = store.read_cells().sort_values("cell_id").reset_index(drop=True)
    samples = store.read_samples().sort_values(["cell_key", "sample", "version"]).reset_index(drop=True)
    return cells, samples


def test_shards_are_consecutive_slices_of_at_most_the_shard_size() -> None:
    assert shard_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert shard_slices(3, 3) == [slice(0, 3)]
    assert len(shard_slices(200, DEFAULT_SHARD_SIZE)) == 1  # small runs stay one shard
    assert len(shard_slices(10_000, DEFAULT_SHARD_SIZE)) == 40  # RobustBench's protocol: 5 rounds on 8 GPUs
    # shard 0 keeps the seed the whole cell had; later shards get their own, from the cell and index
    assert shard_seed("k", 0) != shard_seed("k", 1) != shard_seed("k", 2)
    assert shard_seed("k", 1) == shard_seed("k", 1) != shard_seed("j", 1)


def test_keyed_attacks_give_the_unsharded_numbers_at_any_shard_size(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    whole_cells, whole_samples = _run(pm, tmp_path, "whole")  # 80 samples: one shard
    cut_cells, cut_samples = _run(pm, tmp_path, "cut", shard_size=30)  # 30 + 30 + 20
    pd.testing.assert_frame_equal(whole_cells[MEASURED], cut_cells[MEASURED])
    pd.testing.assert_frame_equal(whole_samples, cut_samples)
    assert (cut_cells["shards"] == 3).all() and (cut_cells["shard_size"] == 30).all()
    assert (whole_cells["shards"] == 1).all() and (cut_cells["batch_size"] == 32).all()
    assert (whole_cells["gradient_calls"] == cut_cells["gradient_calls"]).all()  # the same work, cut in three
    for key in cut_cells["cell_key"]:  # one part per shard, kept as the record of who computed it
        assert len(list((tmp_path / "cut" / "parts" / key).glob("s30-b32-*of3.parquet"))) == 3


def test_a_part_round_trips_through_its_file(tmp_path: Path) -> None:
    out = Outcome(
        clean=torch.tensor([True, False, True]),
        versions=[torch.tensor([False, True, True]), torch.tensor([True, True, False])],
        attacked=[torch.tensor([True, False, True]), torch.tensor([False, False, True])],
        gradient_calls=12,
        queries=30,
        seconds=1.5,
        clean_loss=0.25,
        adv_loss=2.0,
    )
    out.robust = out.clean & out.versions[0] & out.versions[1]
    part = Part(1, 2, torch.tensor([9, 4, 7]), out, ["a", "b"], 0.5, ["set"], 1, {"host": "h"})
    PartStore(tmp_path).write("key", "s3-b2", 1, 2, part.table("key"))
    (table,) = PartStore(tmp_path).read("key", "s3-b2", 2, print).values()
    back = Part.from_table(table)
    assert torch.equal(back.indices, part.indices) and back.versions == ["a", "b"]
    assert torch.equal(back.outcome.clean, out.clean) and torch.equal(back.outcome.robust, out.robust)
    # a version that did not run on a sample leaves it not fooled, as the engine does
    assert back.outcome.versions[0].tolist() == [False, True, True] and back.outcome.attacked[1].tolist() == [
        False,
        False,
        True,
    ]
    assert (back.outcome.queries, back.outcome.clean_loss, back.provenance) == (30, 0.25, {"host": "h"})
    assert PartStore(tmp_path).read("key", "s4-b2", 2, print) == {}  # another shard size: not this run's


def test_shard_size_is_validated_before_any_compute(tmp_path: Path) -> None:
    file = tmp_path / "b.toml"
    file.write_text('[grid]\ndefense = ["baseline"]\nattack = ["pgd"]\n[evaluation]\nshard_size = 0\n')
    with pytest.raises(ConfigError, match="shard_size must be >= 1"):
        load_benchmark(file)
    result = CliRunner().invoke(cli, ["plan", "--defense", "baseline", "--shard-size", "0"])
    assert result.exit_code == 2 and "--shard-size" in result.output


def _data_or_skip() -> None:
    pytest.importorskip("robench.plugins.fashion_mnist").FashionMNIST().locate()  # skips without the data


def test_kill_9_mid_cell_keeps_finished_shards_and_the_rerun_computes_only_the_rest(tmp_path: Path) -> None:
    """``robench run`` as a user runs it, killed with SIGKILL once a shard of the cell is
    stored: ``robench show`` says how far the cell got, and the rerun reuses the stored parts
    (their files untouched) and ends with the numbers of an uninterrupted run."""
    _data_or_skip()
    args = [sys.executable, "-m", "robench", "run", "--defense", "baseline", "-D", "train_subset=600"]
    args += ["-D", "epochs=1", "--attack", "pgd", "-A", "steps=60", "-A", "restarts=4", "--n-samples", "120"]
    args += ["--shard-size", "30", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    with subprocess.Popen([*args, "--out", str(run_dir)], env=env, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("parts/*/*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before a shard was stored"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    stored = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.glob("parts/*/*.parquet")}
    assert 1 <= len(stored) < 4 and not (run_dir / "cells").exists()
    shown = CliRunner().invoke(cli, ["show", str(run_dir)])
    assert f"{len(stored)}/4 shards" in shown.output, shown.output
    again = subprocess.run([*args, "--out", str(run_dir)], env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert f"{len(stored)}/4 shards stored" in again.stderr
    assert again.stderr.count(" shard ") == 4 - len(stored)  # "evaluating ... shard i/4" for the rest only
    for path, (mtime, data) in stored.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    whole = subprocess.run([*args, "--shard-size", "1000", "--out", str(tmp_path / "whole")], env=env, check=False)
    assert whole.returncode == 0
    resumed, uninterrupted = RunStore(run_dir).read_cells(), RunStore(tmp_path / "whole").read_cells()
    pd.testing.assert_frame_equal(resumed[MEASURED], uninterrupted[MEASURED])


def test_check_notes_another_batch_or_shard_size_but_pairs_the_cells() -> None:
    base = pd.DataFrame({"batch_size": [250, 250], "shard_size": [250, 250]})
    assert sampling_notes(base, base) == ()
    notes = sampling_notes(pd.DataFrame({"batch_size": [64, 64], "shard_size": [250, 250]}), base)
    assert notes[0] == "attack batch size: baseline [250], run [64]" and "batch-seeded" in notes[1]
    older = pd.DataFrame({"batch_size": [None, None], "shard_size": [None, None]})  # an older robench's folder
    assert sampling_notes(base, older) == ()


def test_defenses_that_start_from_another_model_declare_it_for_the_task_graph() -> None:
    from robench.plugins.advft import AdverFine
    from robench.plugins.proard.defense import ProARD

    assert AdverFine(start="scratch", compression="qat").requires() == ()
    assert AdverFine(start="baseline").requires() == (PluginSpec.of("baseline", {}),)
    assert AdverFine(start="advt", eps=0.05).requires() == (PluginSpec.of("advt", {"eps": 0.05}),)
    teacher = ProARD()
    assert teacher.requires() == (PluginSpec.of("trades", teacher.teacher_params()),)
    (progressive,) = ProARD(training="static").requires()
    assert progressive.name == "proard" and "training" not in dict(progressive.params)
