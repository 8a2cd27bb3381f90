"""The issue's trap defenses through the model checks, on Fashion-MNIST (issues 11 and 22).

Each trap (tests/fake_dist/robench_traps.py, written from the public API as a third party
would) wraps the smoke ``baseline`` and hides one evaluation trap; this runs them as the
issues did, ``--attack pgd --n-samples 200`` at eps 0.1, next to the baseline itself, and
prints each row's accuracies, what the checks found, which versions fooled its samples,
the indicators of attack failure, and the checks' share of the cell's time: ``before`` is
the model checks alone (what a cell cost before the indicators), ``after`` the checks and
the indicators together, both from the rows' timing columns of this one run:

    python benchmarks/model_checks.py [--out results/reproductions/model-checks] [--smoke]

About 5 minutes on 2 CPU cores (two baseline trainings, then transfer and Square on the
traps that mask or lack gradients). ``--smoke`` runs the same grid on robench.testing's tiny
synthetic dataset and network (16 samples, PGD-3) in under a minute, to check
that the script still works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore
from robench.testing import TinyPlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fake_dist"))
import robench_traps  # a test plugin, not installed: registered by hand below

DEFENSES = [
    "baseline",
    "trap-rounding",
    "trap-noise",
    "trap-softmax",
    "trap-classes",
    "trap-tuple",
    "trap-batchnorm",
    "trap-nograd",
    "trap-onehot",
    "trap-rounding-bpda",
]
COLUMNS = ["clean_acc", "robust_acc", "status", "checks", "bpda", "n_versions", "fooled_by"]
SHARES = ["indicators", "check_share_before", "check_share_after"]
SMOKE_BASELINE = {"epochs": 3, "lr": 0.05}


def fooled_by(cell: pd.Series, samples: pd.DataFrame) -> str:
    """``version: samples`` for every version that fooled some of the cell's samples."""
    labels = json.loads(cell["versions"]) if isinstance(cell["versions"], str) else []
    fooled = samples[(samples["cell_key"] == cell["cell_key"]) & (samples["version"] >= 0) & ~samples["correct"]]
    counts = fooled.groupby("version").size()
    return ", ".join(f"{labels[int(v)].split('[')[0]}{_source(labels[int(v)])}: {n}" for v, n in counts.items())


def _source(label: str) -> str:
    return "@" + label.split("@")[1].split("#")[0] if "@" in label else ""


def main() -> None:
    """Run the grid and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="a tiny, fast setting (checks the script runs)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="robench-checks-"))
    out, cache = args.out or tmp / "run", args.cache_dir or tmp / "cache"
    pm = get_plugin_manager()
    pm.register(robench_traps, name="traps")
    if args.smoke:
        pm.register(TinyPlugin(), name="tiny")
    params = SMOKE_BASELINE if args.smoke else {}
    benchmark = Benchmark(
        name="model-checks",
        datasets=("tiny",) if args.smoke else ("fashion-mnist",),
        archs=("tinynet",) if args.smoke else ("cnn8",),
        defenses=tuple(PluginSpec.of(name, params) for name in DEFENSES),
        attacks=(PluginSpec.of("pgd", {"steps": 3, "restarts": 1}) if args.smoke else PluginSpec("pgd"),),
        eps=(0.1,),
        n_samples=16 if args.smoke else 200,
    )
    run(benchmark, pm=pm, run_dir=out, cache_dir=cache, device="cpu")
    store = RunStore(out)
    cells = store.read_cells().set_index("defense").loc[DEFENSES]
    samples = store.read_samples()
    cells["fooled_by"] = [fooled_by(row, samples) for _, row in cells.iterrows()]
    checks, indicators = cells["check_seconds"], cells["indicator_seconds"]
    cells["check_share_before"] = checks / (checks + cells["attack_seconds"])
    cells["check_share_after"] = (checks + indicators) / (checks + indicators + cells["attack_seconds"])
    values = [
        c for c in cells.columns if c.startswith("indicator_") and c not in ("indicator_attack", "indicator_seconds")
    ]
    with pd.option_context("display.width", 250, "display.max_colwidth", 80, "display.max_columns", 20):
        print(cells[COLUMNS].to_string())
        print(cells[SHARES].to_string())
        print(cells[values].rename(columns=lambda c: c.removeprefix("indicator_")).round(3).to_string())
        for name, row in cells[cells["status"] != "ok"].iterrows():
            print(f"{name}: {row['error']}")
    ok = cells[cells["status"] == "ok"]
    cheaper = bool((ok["check_seconds"] < ok["attack_seconds"]).all())
    largest = ok["check_share_after"].max()
    print(f"checks cost less than the attack in every ok cell: {cheaper} (largest share {largest:.1%})")


if __name__ == "__main__":
    main()
