"""Robust accuracy of randomized models against the number of EOT draws: how many are enough?

Evaluates EIO's random gated network (``eio``, variant ``rgn``, smoke preset) and a
randomized trap (``trap-noise``: the smoke ``baseline`` behind Gaussian input noise, found
randomized by the model checks) on real Fashion-MNIST with ``--attack pgd -A restarts=1
-P eot=N`` at eps 0.1, for every N of ``--draws``, each through ``robench.run`` (model checks,
votes, and the EOT probe of robench/execute/eotcheck.py, which reruns the attack at N/2
draws). Prints per model and N: robust accuracy with its Wilson interval, the paired change
against the largest N (samples robust at N but fooled at the largest, and the reverse), the
probe's half-draw accuracy, p-value and flag, and the attack's seconds. ``DEFAULT_EOT``
(robench/protocol.py) was chosen from this curve::

    python benchmarks/eot_curve.py [--draws 10,20,40,80] [--n-samples 200] [--out DIR] [--cache-dir DIR]

About 25 minutes on 2 CPU cores, most of it the 80-draw attacks (the EIO build trains for
about a minute first). ``--smoke`` runs a tiny version (a few seconds) for the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.config import Benchmark, exclude_entry
from robench.plugin import PluginSpec
from robench.results.metrics import wilson_interval
from robench.results.storage import RunStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fake_dist"))
import robench_traps  # a test plugin, not installed: registered by hand below

SMOKE_EIO = {
    "train_subset": 256,
    "diversify_subset": 64,
    "warmup_epochs": 1,
    "epochs": 1,
    "finetune_epochs": 1,
    "distill_steps": 2,
}
SMOKE_TRAP = {"train_subset": 256, "epochs": 1}


def benchmark(draws: int, args: argparse.Namespace) -> Benchmark:
    """The two randomized models under PGD with ``draws`` EOT draws."""
    eio, trap = (SMOKE_EIO, SMOKE_TRAP) if args.smoke else ({}, {})
    return Benchmark(
        name=f"eot-{draws}",
        defenses=(PluginSpec.of("eio", eio), PluginSpec.of("trap-noise", trap)),
        attacks=(PluginSpec.of("pgd", {"restarts": 1, **({"steps": 3} if args.smoke else {})}),),
        attack_settings=(PluginSpec.of("pgd", {"eot": draws}),),
        eps=(args.eps,),
        n_samples=args.n_samples,
        exclude=(exclude_entry({"defense": "eio", "variant": "derived"}),),  # deterministic
    )


def curve(args: argparse.Namespace, out: Path, cache: Path) -> pd.DataFrame:
    """One row per (model, draws): the cell's numbers; per-sample verdicts kept for pairing."""
    pm = get_plugin_manager()
    pm.register(robench_traps, name="traps")
    rows: list[dict[str, Any]] = []
    robust: dict[tuple[str, int], pd.Series] = {}
    for draws in args.draws:
        folder = out / f"eot-{draws}"
        run(benchmark(draws, args), pm=pm, run_dir=folder, cache_dir=cache, device="cpu")
        store = RunStore(folder)
        samples = store.read_samples()
        for _, cell in store.read_cells().iterrows():
            model = f"{cell['defense']}/{cell['variant']}"
            mine = samples[samples["cell_key"] == cell["cell_key"]]
            robust[model, draws] = mine.groupby("sample")["correct"].all()
            rows.append({"model": model, **{str(k): v for k, v in cell[COLUMNS].items()}})
    table = pd.DataFrame(rows)
    top = max(args.draws)
    for i, row in table.iterrows():
        here, last = robust[row["model"], row["eot"]], robust[row["model"], top]
        table.loc[i, "robust_here_fooled_at_max"] = int((here & ~last).sum())
        table.loc[i, "fooled_here_robust_at_max"] = int((~here & last).sum())
    return table


COLUMNS = [
    "n",
    "clean_acc",
    "robust_acc",
    "eot",
    "votes",
    "eot_half",
    "eot_half_acc",
    "eot_p",
    "flag_eot_not_converged",
    "attack_seconds",
]


def show(table: pd.DataFrame) -> None:
    """Print the curve, one block per model."""
    for model, part in table.groupby("model", sort=False):
        print(f"\n{model}: clean {100 * part['clean_acc'].iloc[0]:.1f} %, n={int(part['n'].iloc[0])}")
        print("  eot  robust % [95% CI]     vs max eot: +robust/-robust  half-draw %  p      flag   seconds")
        for _, r in part.iterrows():
            n = int(r["n"])
            low, high = wilson_interval(round(r["robust_acc"] * n), n)
            half = "  -  " if pd.isna(r["eot_half_acc"]) else f"{100 * r['eot_half_acc']:5.1f}"
            p = "  -  " if pd.isna(r["eot_p"]) else f"{r['eot_p']:.3f}"
            print(
                f"  {int(r['eot']):>3}  {100 * r['robust_acc']:5.1f} [{100 * low:4.1f}, {100 * high:4.1f}]"
                f"        {int(r['robust_here_fooled_at_max']):>3} / {int(r['fooled_here_robust_at_max']):<3}"
                f"        {half}      {p}  {bool(r['flag_eot_not_converged'])!s:5}  {r['attack_seconds']:7.1f}"
            )


def main() -> None:
    """Run the curve and print it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", default="10,20,40,80", help="comma-separated EOT draw counts")
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary one)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: $ROBENCH_CACHE)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 and 4 draws, 8 samples (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.draws, args.n_samples = "2,4", 8
    args.draws = [int(d) for d in str(args.draws).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="robench-eot-"))
    default_cache = Path(os.environ.get("ROBENCH_CACHE", Path.home() / ".cache" / "robench"))
    cache = args.cache_dir or (tmp / "cache" if args.smoke else default_cache)
    show(curve(args, args.out or tmp / "runs", cache))


if __name__ == "__main__":
    main()
