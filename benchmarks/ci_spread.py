"""Seed-to-seed spread of the CI grid: how far a correct retraining can land from the baseline.

robench's training gate (README, "Regression checks") trains ``benchmarks/ci.toml`` afresh
and compares it with the committed baseline. A fresh model differs from the baseline's
even for unchanged code: another CPU's float kernels (AVX2 against AVX-512 paths in ATen,
oneDNN and MKL) send a short training run elsewhere, much as another seed does. This
script measures that spread: it trains and evaluates the grid with several seeds (each
seed's models evaluated on the same samples), prints every cell's mean, standard deviation
and range across seeds, and the tolerance the training gate should use: the largest drop a
correct build may show against a baseline that is itself one such draw, taken as 3
standard deviations of the difference of two draws (3 x sqrt(2) x the std of the noisiest
cell), rounded up to a whole point. Usage::

    python benchmarks/ci_spread.py [--seeds 5] [--out DIR] [--cache-dir DIR]

``--smoke`` trains the grid's defenses on 256 images for one epoch, with 2 seeds, and
evaluates 8 samples (for the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from pathlib import Path

import pandas as pd

from robench.discover.manager import get_plugin_manager
from robench.execute.progress import TqdmProgress
from robench.execute.runner import run
from robench.plan.benchfile import load_benchmark
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore

HERE = Path(__file__).resolve().parent


def spread(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (defense, eps, metric): mean, std, min and max across seeds, in percent."""
    cells = cells[cells["status"] == "ok"]
    long = cells.melt(["defense", "eps", "seed"], ["clean_acc", "robust_acc"], "metric", "acc")
    long["acc"] *= 100
    table = long.groupby(["defense", "eps", "metric"])["acc"].agg(["count", "mean", "std", "min", "max"])
    return table.round(2)


def smoke(benchmark: Benchmark) -> Benchmark:
    """The grid with tiny trainings and 8 samples."""
    tiny = {"train_subset": 256, "epochs": 1}
    defenses = tuple(PluginSpec.of(s.name, {**s.param_dict(), **tiny}) for s in benchmark.defenses)
    return dataclasses.replace(benchmark, defenses=defenses, n_samples=8)


def main() -> None:
    """Run the grid with ``--seeds`` seeds and print the spread and the tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--file", type=Path, default=HERE / "ci.toml")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: a fresh one)")
    parser.add_argument("--smoke", action="store_true", help="tiny trainings, 2 seeds, 8 samples (for the tests)")
    args = parser.parse_args()
    benchmark = load_benchmark(args.file)
    if args.smoke:
        benchmark, args.seeds = smoke(benchmark), 2
    benchmark = dataclasses.replace(benchmark, seeds=tuple(range(args.seeds)))
    scratch = Path(tempfile.mkdtemp(prefix="robench-spread-"))
    out, cache = args.out or scratch / "run", args.cache_dir or scratch / "cache"
    run(benchmark, pm=get_plugin_manager(), run_dir=out, cache_dir=cache, device="cpu", progress=TqdmProgress())
    table = spread(RunStore(out).read_cells())
    print(table.to_string())
    worst = float(table["std"].max())
    tolerance = math.ceil(3 * math.sqrt(2) * worst)
    print(f"\nlargest seed-to-seed std: {worst:.2f} points; training-gate tolerance: {tolerance} points")
    print(f"run folder: {out}")


if __name__ == "__main__":
    main()
