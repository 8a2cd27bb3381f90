"""Shards over devices (issue 20): speed-ups measured on this machine, and a simulation for 8 GPUs.

Measured, one run each, side by side in one process on the ``advt`` smoke model (Fashion-MNIST,
built once before any timing):

1. one ``whitebox-pgd`` cell of ``--n-pgd`` samples: the local executor with 1 thread against
   Ray with 2 shard tasks of 1 CPU each (tables must be identical);
2. the same for ``autoattack`` on ``--n-aa`` samples in 2 shards;
3. the cost of sharding: the local executor with shards of 250 against one shard, on the
   ``whitebox-pgd`` cell of step 1.

Simulated (a small event model, fed with the task durations measured above): the makespan
on 8 GPUs of (a) 4 defenses x 3 seeds x 2 protocols and (b) one RobustBench-size model under
AutoAttack on 10,000 samples, each against its lower bound (the longer of the critical path
and the total work over 8 devices), for the task graph and for the old design (one task per
model group, waiting on locks while holding its GPU).

    python benchmarks/shards.py [--n-pgd 2000] [--n-aa 500] [--cache-dir DIR] [--smoke]

About 25 minutes on 2 idle cores (AutoAttack dominates); ``--smoke`` takes a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plan.config import Benchmark
from robench.plan.execution import Execution
from robench.plugin import PluginSpec
from robench.results.storage import RunStore

MEASURED = ["cell_id", "n", "clean_acc", "robust_acc", "robust_ci_low", "robust_ci_high", "n_versions"]


LOCAL = Execution()
DEFENSE = [PluginSpec("advt")]
"""The evaluated model: the advt smoke model (``--smoke``: a few seconds' advt on 500 images)."""


def cell(protocol: str, n: int, shard_size: int, execution: Execution = LOCAL) -> Benchmark:
    """One cell: the evaluated model (Fashion-MNIST, eps 0.1) under ``protocol``."""
    return Benchmark(
        name=f"shards-{protocol}",
        defenses=(DEFENSE[0],),
        protocols=(PluginSpec(protocol),),
        n_samples=n,
        shard_size=shard_size,
        execution=execution,
    )


CACHE: list[Path] = []
"""The model cache every run shares (``--cache-dir``, or a temporary folder)."""


def timed(benchmark: Benchmark, tmp: Path, name: str) -> tuple[float, pd.DataFrame, pd.DataFrame]:
    """Wall seconds of ``benchmark`` (its model from the shared cache), its cells and samples."""
    start = time.perf_counter()
    cache = CACHE[0] if CACHE else tmp / "cache"
    run(benchmark, pm=get_plugin_manager(), run_dir=tmp / name, cache_dir=cache, device="cpu")
    seconds = time.perf_counter() - start
    store = RunStore(tmp / name)
    samples = store.read_samples().sort_values(["sample", "version"]).reset_index(drop=True)
    return seconds, store.read_cells()[MEASURED], samples.drop(columns="cell_key")


def shard_seconds(tmp: Path, name: str) -> list[float]:
    """Wall seconds of each stored shard of a run (from its parts' provenance)."""
    import pyarrow.parquet as pq

    from robench.execute.shards import Part

    parts = [Part.from_table(pq.read_table(p)) for p in sorted((tmp / name / "parts").rglob("*.parquet"))]
    return [p.provenance["finished"] - p.provenance["started"] for p in parts]


def compare(label: str, tmp: Path, protocol: str, n: int) -> dict[str, float]:
    """Local (1 thread) against Ray (2 shard tasks of 1 CPU) on one cell of ``n`` samples."""
    half = (n + 1) // 2
    local_s, local_cells, local_samples = timed(cell(protocol, n, half), tmp, f"{label}-local")
    ray_exec = Execution("ray", cpus_per_task=1)
    ray_s, ray_cells, ray_samples = timed(cell(protocol, n, half, ray_exec), tmp, f"{label}-ray")
    same = local_cells.equals(ray_cells) and local_samples.equals(ray_samples)
    acc = float(local_cells["robust_acc"].iloc[0])
    print(f"{label}: local {local_s:.1f} s, ray 2x1 CPU {ray_s:.1f} s: speed-up {local_s / ray_s:.2f}x; ", end="")
    print(f"robust {100 * acc:.1f} %, tables identical: {same}")
    if not same:
        raise SystemExit(f"{label}: the local and Ray tables differ")
    shards = shard_seconds(tmp, f"{label}-local")
    return {"local": local_s, "ray": ray_s, "per_sample": sum(shards) / n}


def sharding_cost(tmp: Path, n: int, size: int) -> None:
    """The local executor with shards of ``size`` against one shard, on the same cell."""
    one_s, one_cells, _ = timed(cell("whitebox-pgd", n, n), tmp, "cost-one")
    many_s, many_cells, _ = timed(cell("whitebox-pgd", n, size), tmp, "cost-many")
    same = one_cells.equals(many_cells)
    print(f"sharding cost: {n} samples in shards of {size}: {many_s:.1f} s against one shard {one_s:.1f} s: ", end="")
    print(f"{100 * (many_s / one_s - 1):+.1f} %; tables identical: {same}")


@dataclasses.dataclass(frozen=True)
class Task:
    """A task of the event model: its duration and the tasks it needs first."""

    name: str
    seconds: float
    needs: tuple[str, ...] = ()


def schedule(tasks: Sequence[Task], devices: int, hold: bool = False) -> float:
    """Makespan of ``tasks`` on ``devices``. As Ray runs a task graph: a task starts on a free
    device once all it needs has finished, the earliest submitted first. With ``hold`` (the
    old design), tasks start in submission order on the first free device and wait there,
    holding it, until what they need has finished."""
    finish: dict[str, float] = {}
    free = [0.0] * devices
    pending = list(tasks)
    while pending:
        ready = pending[:1] if hold else [t for t in pending if all(n in finish for n in t.needs)]
        task = min(ready, key=lambda t: max([finish.get(n, 0.0) for n in t.needs], default=0.0))
        needed = max([finish[n] for n in task.needs], default=0.0)
        device = min(range(devices), key=lambda d: free[d] if hold else max(free[d], needed))
        start = max(free[device], needed)
        finish[task.name] = free[device] = start + task.seconds
        pending.remove(task)
    return max(finish.values())


def lower_bound(tasks: Sequence[Task], devices: int) -> tuple[float, float]:
    """(critical path, total work / devices) of ``tasks``."""
    by_name = {t.name: t for t in tasks}
    longest: dict[str, float] = {}

    def path(name: str) -> float:
        if name not in longest:
            task = by_name[name]
            longest[name] = task.seconds + max((path(n) for n in task.needs), default=0.0)
        return longest[name]

    return max(path(t.name) for t in tasks), sum(t.seconds for t in tasks) / devices


def grid_tasks(build: float, shard: float, set_seconds: float, shards: int, graph: bool) -> list[Task]:
    """(a) 4 defenses x 3 seeds x 2 protocols (white-box; transfer from 3 held-out baselines).

    Durations from the measured unit costs: ``build`` a model (advt and eio train 3x longer,
    advft fine-tunes advt's model), ``shard`` a shard, ``set_seconds`` a transfer set (3 per
    seed). With ``graph``, the task graph. Otherwise the old design: one task per model group,
    in plan order, that builds its model and evaluates its cells; the first group of a seed
    also builds the surrogates and the seed's sets, and the others wait for them (and advft
    for advt's model) holding their device (:func:`schedule` with ``hold``).
    """
    cost = {"baseline": build, "advt": 3 * build, "eio": 3 * build, "advft": build}
    tasks: list[Task] = []
    if graph:
        tasks += [Task(f"surrogate{i}", build) for i in range(3)]
        tasks += [Task(f"set{seed}-{i}", set_seconds, (f"surrogate{i}",)) for seed in range(3) for i in range(3)]
    for seed in range(3):
        for defense, seconds in cost.items():
            name = f"build-{defense}-{seed}"
            needs = (f"build-advt-{seed}",) if defense == "advft" else ()
            if not graph:
                first = defense == "baseline"
                extra = (3 * build if seed == 0 else 0.0) + 3 * set_seconds if first else 0.0
                waits = () if first else (f"build-baseline-{seed}",)  # its sets: made by the seed's first group
                tasks.append(Task(name, seconds + extra + 2 * shards * shard, needs + waits))
                continue
            tasks.append(Task(name, seconds, needs))
            for protocol in ("white", "transfer"):
                sets = tuple(f"set{seed}-{i}" for i in range(3)) if protocol == "transfer" else ()
                tasks += [Task(f"{name}-{protocol}-{k}", shard, (name, *sets)) for k in range(shards)]
    return tasks


def simulate(build: float, load: float, shard_pgd: float, shard_aa: float) -> None:
    """Print the simulated makespans on 8 GPUs against the lower bound of the workload (the
    task graph's: the longer of its critical path and its total work over 8 devices)."""
    graph = grid_tasks(build, shard_pgd, shard_pgd, 4, True)
    bound = _report("(a) 4 defenses x 3 seeds x 2 protocols, task graph", graph)
    old = grid_tasks(build, shard_pgd, shard_pgd, 4, False)
    _report("(a) the same, one task per model group (old design)", old, bound, hold=True)
    for size in (250, 500):
        count = 10_000 // size
        shard = shard_aa * size / 250
        tasks = [Task("build", load)] + [Task(f"shard{k}", shard, ("build",)) for k in range(count)]
        bound = _report(f"(b) AutoAttack on 10,000 samples, shards of {size}", tasks)
    _report("(b) the same, one task per model group (old design)", [Task("group", load + 40 * shard_aa)], bound)


def _report(label: str, tasks: Sequence[Task], bound: float = 0.0, hold: bool = False) -> float:
    """Print one line; return the lower bound it was compared with (its own, unless given)."""
    makespan = schedule(tasks, 8, hold)
    critical, work = lower_bound(tasks, 8)
    bound = bound or max(critical, work)
    print(
        f"  {label}: makespan {makespan:.0f} s on 8 GPUs, {makespan / bound:.2f}x the lower bound {bound:.0f} s "
        f"(critical path {critical:.0f} s, work/8 {work:.0f} s; speed-up {8 * work / makespan:.1f} of 8)"
    )
    return bound


def main(argv: Sequence[str] | None = None) -> None:
    """Run the measurements and the simulation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-pgd", type=int, default=2000, help="samples of the whitebox-pgd cell")
    parser.add_argument("--n-aa", type=int, default=500, help="samples of the autoattack cell")
    parser.add_argument("--cache-dir", type=Path, help="model cache to reuse (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="a tiny, fast setting (the benchmark smoke test)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        CACHE.append(args.cache_dir)
    n_pgd, n_aa = (20, 10) if args.smoke else (args.n_pgd, args.n_aa)
    if args.smoke:
        DEFENSE[0] = PluginSpec.of("advt", {"train_subset": 500, "epochs": 1, "attack_steps": 1})
    torch.set_num_threads(1)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="robench-shards-") as folder:
        tmp = Path(folder)
        start = time.perf_counter()
        timed(cell("whitebox-pgd", 10, 10, Execution("ray", cpus_per_task=1)), tmp, "warm-up")  # build; warm workers
        build = time.perf_counter() - start
        start = time.perf_counter()
        timed(cell("whitebox-pgd", 10, 10), tmp, "load")  # the model from the cache: a zoo model's "build"
        load = time.perf_counter() - start
        print(f"advt smoke model built in {build:.0f} s (1 thread), loaded and checked in {load:.1f} s")
        pgd = compare("whitebox-pgd", tmp, "whitebox-pgd", n_pgd)
        aa = compare("autoattack", tmp, "autoattack", n_aa)
        sharding_cost(tmp, n_pgd, max(n_pgd // 8, 1))
    ray.shutdown()
    print("simulation, durations from this run (a shard: 250 samples):")
    simulate(build, load, 250 * pgd["per_sample"], 250 * aa["per_sample"])


if __name__ == "__main__":
    main()
