"""A real, small run on Fashion-MNIST through the public command, as a user runs it.

Trains a baseline and an adversarially trained cnn8 on a subset (about a minute each on two
cores), attacks both with all-or-nothing PGD, and checks the printed table, the parquet
schema, resume, and that adversarial training is far more robust than the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import Shell

from robench.plugins.fashion_mnist import FashionMNIST
from robench.results.storage import CELL_SCHEMA, SAMPLE_SCHEMA, RunStore

pytestmark = pytest.mark.slow

# Small but real: 6000 training images, 2 epochs, PGD-10 x 2 restarts on 300 test images.
ARGS = [
    "run",
    "--defense",
    "baseline",
    "--defense",
    "advt",
    "--attack",
    "pgd",
    "-D",
    "train_subset=6000",
    "-D",
    "epochs=2",
    "-D",
    "lr=0.05",
    "-D",
    "batch_size=32",
    "-D",
    "advt.attack_steps=3",
    "-A",
    "steps=10",
    "-A",
    "restarts=2",
    "--n-samples",
    "300",
]


@pytest.fixture(scope="module")
def have_data() -> None:
    try:
        FashionMNIST().locate()
    except Exception as exc:  # any reason to be missing means skip
        pytest.skip(f"Fashion-MNIST not available: {exc}")


def test_real_run_baseline_vs_advt(have_data: None, tmp_path: Path, shell: Shell) -> None:
    out_dir = tmp_path / "run"
    args = [*ARGS, "--out", str(out_dir), "--cache-dir", str(tmp_path / "cache")]
    code, printed = shell(args)
    assert code == 0, printed
    assert "baseline" in printed and "advt" in printed and "robust %" in printed

    cells = pq.read_table(out_dir / "cells")
    assert cells.schema.names == CELL_SCHEMA.names
    assert pq.read_table(out_dir / "samples").schema.names == SAMPLE_SCHEMA.names
    table = RunStore(out_dir).read_cells().set_index("defense")
    assert (table["status"] == "ok").all() and (table["n"] == 300).all() and (table["n_versions"] == 2).all()
    assert table.loc["advt", "clean_acc"] > 0.5 and table.loc["baseline", "clean_acc"] > 0.6
    # Adversarial training is far more robust, and the intervals do not overlap.
    assert table.loc["advt", "robust_acc"] > table.loc["baseline", "robust_acc"] + 0.15
    assert table.loc["advt", "robust_ci_low"] > table.loc["baseline", "robust_ci_high"]
    assert (table["params"] == 549_994).all() and (table["macs"] > 10_000_000).all()
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert len(manifest["eval_indices"]["fashion-mnist"]) == 300

    # Running again reuses everything: no training, no attack, same table.
    code, again = shell(args)
    assert code == 0 and "2 cell(s) reused" in again
    assert printed.splitlines()[:3] == again.splitlines()[:3]


def test_show_prints_a_stored_run(have_data: None, tmp_path: Path, shell: Shell) -> None:
    code, _ = shell(["show", str(tmp_path)])
    assert code == 2  # not a run folder: a clear error, no traceback
    code, printed = shell(["show", "--schema"])
    assert code == 0 and "robust_acc" in printed and "Wilson" in printed


def test_user_errors_exit_2_before_compute(shell: Shell) -> None:
    code, printed = shell(["run", "--defense", "basline"])
    assert code == 2 and "error: unknown defense 'basline'. Did you mean: baseline?" in printed
    assert "Traceback" not in printed
    code, printed = shell(["run", "-D", "epoch=3"])
    assert code == 2 and "unknown parameter(s) epoch" in printed and "epochs: int" in printed
    code, printed = shell(["run", "-D", "avdt.eps=0.1"])
    assert code == 2 and "'avdt' is not one of the plugins in this run" in printed
