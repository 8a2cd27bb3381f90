"""Local executor against the Ray executor on one grid, side by side in one process (issue 15).

Runs ``benchmarks/ci.toml`` (baseline and advt, 2 eps, 300 samples) twice from fresh caches,
once per executor, prints both wall times and their ratio, and checks the tables are equal.
Then it times the cost of the training checkpoints: the ``advt`` build trained with its
scratch folder (checkpoints at every epoch's end, the default) against the same build with
none, and, as the worst case, with a checkpoint after every batch.

    python benchmarks/executors.py [--cpus-per-task N]

About 6 minutes on 2 idle CPU cores. ``--cpus-per-task`` 1 runs the two model groups side by
side with one thread each (their numbers then match a local run with one thread, not two).
``--smoke`` does the same on tiny trainings and 8 samples (for the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.benchfile import load_benchmark
from robench.plan.config import Benchmark
from robench.plan.execution import Execution
from robench.plugin import PluginSpec
from robench.results.storage import RunStore

GRID = Path(__file__).resolve().parent / "ci.toml"
MEASURED = ["cell_id", "n", "clean_acc", "robust_acc", "robust_ci_low", "robust_ci_high"]
SMOKE = False  # --smoke: tiny trainings and 8 samples


def grid() -> Benchmark:
    """The CI grid (with ``--smoke``, its defenses on 256 images for one epoch, and 8 samples)."""
    benchmark = load_benchmark(GRID)
    if not SMOKE:
        return benchmark
    tiny = {"train_subset": 256, "epochs": 1}
    defenses = tuple(PluginSpec.of(s.name, {**s.param_dict(), **tiny}) for s in benchmark.defenses)
    return dataclasses.replace(benchmark, defenses=defenses, n_samples=8)


def timed_run(executor: Execution, tmp: Path, name: str) -> tuple[float, pd.DataFrame]:
    """Wall seconds of the grid through ``executor`` from a fresh cache, and its table."""
    benchmark = dataclasses.replace(grid(), execution=executor)
    start = time.perf_counter()
    run(benchmark, pm=get_plugin_manager(), run_dir=tmp / name, cache_dir=tmp / f"{name}-cache", device="cpu")
    seconds = time.perf_counter() - start
    cells = RunStore(tmp / name).read_cells().sort_values("cell_id").reset_index(drop=True)
    return seconds, cells[MEASURED]


def checkpoint_cost(tmp: Path) -> dict[str, float]:
    """Training seconds of the ci grid's advt build: without checkpoints, with the default
    ones (each epoch's end), and with one after every batch (the worst case)."""
    out = {}
    for label, period, scratch in (("none", "600", False), ("epoch", "600", True), ("batch", "0", True)):
        os.environ["ROBENCH_CHECKPOINT_SECONDS"] = period
        out[label] = _build_advt(tmp / f"ckpt-{label}", scratch)
    os.environ.pop("ROBENCH_CHECKPOINT_SECONDS", None)
    return out


def _build_advt(folder: Path, scratch: bool) -> float:
    """Seconds to train the ci grid's advt model, with or without a scratch folder."""
    import robench
    from robench.discover.registry import Registries
    from robench.execute.modelcache import ModelFactory
    from robench.plan.grid import resolve_defense

    registries = Registries.collect(get_plugin_manager())
    benchmark = grid()
    spec = next(s for s in benchmark.defenses if s.name == "advt")
    defense = resolve_defense(registries, spec, benchmark.preset, "fashion-mnist")
    dataset = registries.datasets.get("fashion-mnist")
    arch = registries.architectures.get("cnn8").create()
    folder.mkdir(parents=True)
    ctx = robench.Context(
        train=dataset.create().load("train"),
        shape=dataset.shape,
        new_model=ModelFactory(arch, dataset.shape, 0),
        device=torch.device("cpu"),
        seed=0,
        preset=benchmark.preset,
        cache_dir=folder if scratch else folder / "absent",  # no folder: robench.train saves nothing
        default_eps=dataset.default_eps["linf"],
        progress=robench.Progress(),
    )
    start = time.perf_counter()
    defense.fit(ctx)
    return time.perf_counter() - start


def main() -> None:
    """Time both executors and the checkpoints; print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus-per-task", type=int, default=0, help="CPUs (and threads) per Ray task")
    parser.add_argument("--smoke", action="store_true", help="tiny trainings, 8 samples (for the tests)")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        local_s, local = timed_run(Execution(), tmp, "local")
        ray_s, remote = timed_run(Execution("ray", cpus_per_task=args.cpus_per_task), tmp, "ray")
        same = local.equals(remote)
        print(f"local executor: {local_s:.1f} s; ray executor: {ray_s:.1f} s; ray/local = {ray_s / local_s:.2f}")
        print(f"tables identical: {same}")
        if not same:
            print(pd.concat({"local": local, "ray": remote}, axis=1).to_string())
        cost = checkpoint_cost(tmp)
        for label in ("epoch", "batch"):
            share = (cost[label] - cost["none"]) / cost["none"]
            print(
                f"advt build with checkpoints at each {label}: {cost[label]:.1f} s vs {cost['none']:.1f} s "
                f"without ({100 * share:+.1f} %)"
            )


if __name__ == "__main__":
    main()
