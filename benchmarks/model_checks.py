"""The issue's trap defenses through the model checks, on Fashion-MNIST (issue 11's table).

Each trap (tests/fake_dist/robench_traps.py) wraps the smoke ``baseline`` and hides one
evaluation trap; this runs them as the issue did, ``--attack pgd --n-samples 200`` at eps
0.1, next to the baseline itself, and prints each row's accuracies, what the checks found
and the checks' share of the cell's time:

    python benchmarks/model_checks.py [--out results/reproductions/model-checks]

About 5 minutes on 2 CPU cores (two baseline trainings, then Square on the rounding trap).
It also prints whether the checks cost less than the attack in every cell (a timing the tests
no longer assert: it depends on the machine's load). ``--smoke`` runs the traps on a baseline
trained on 256 images for one epoch, 16 samples and PGD-2 (for the tests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fake_dist"))
import robench_traps  # a test plugin, not installed: registered by hand below

DEFENSES = ["baseline", "trap-rounding", "trap-noise", "trap-softmax", "trap-classes", "trap-tuple", "trap-batchnorm"]
COLUMNS = ["clean_acc", "robust_acc", "status", "checks", "n_versions", "masking_found_by", "check_share"]


def main() -> None:
    """Run the grid and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="a tiny baseline, 16 samples, PGD-2 (for the tests)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="robench-checks-"))
    out, cache = args.out or tmp / "run", args.cache_dir or tmp / "cache"
    pm = get_plugin_manager()
    pm.register(robench_traps, name="traps")
    tiny = {"train_subset": 256, "epochs": 1} if args.smoke else {}
    benchmark = Benchmark(
        name="model-checks",
        defenses=tuple(PluginSpec.of(name, tiny) for name in DEFENSES),
        attacks=(PluginSpec.of("pgd", {"steps": 2, "restarts": 1} if args.smoke else {}),),
        eps=(0.1,),
        n_samples=16 if args.smoke else 200,
    )
    run(benchmark, pm=pm, run_dir=out, cache_dir=cache, device="cpu")
    cells = RunStore(out).read_cells().set_index("defense").loc[DEFENSES]
    cells["check_share"] = cells["check_seconds"] / (cells["check_seconds"] + cells["attack_seconds"])
    with pd.option_context("display.width", 250, "display.max_colwidth", 110, "display.max_columns", 20):
        print(cells[COLUMNS].to_string())
        for name, row in cells[cells["status"] != "ok"].iterrows():
            print(f"{name}: {row['error']}")
    ok = cells[cells["status"] == "ok"]
    cheaper = bool((ok["check_seconds"] < ok["attack_seconds"]).all())
    print(f"checks cost less than the attack in every ok cell: {cheaper} (largest share {ok['check_share'].max():.1%})")


if __name__ == "__main__":
    main()
