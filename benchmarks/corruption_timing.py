"""Time the generation of the 75 corruption sets (15 corruptions x severities 1-5) for the 10,000
Fashion-MNIST test images, through the same path the runner takes (engine.generate with the
per-sample keys), without touching any cache. Prints seconds per corruption (all 5 severities)
and the total, sorted, so what dominates is plain.

    OMP_NUM_THREADS=1 python benchmarks/corruption_timing.py [--n 10000] [--batch-size 250]

``--smoke`` generates the 15 corruptions at severity 1 for 4 images (for the tests).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from robench.context import Threat
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.engine import Setup, generate
from robench.execute.versions import expand


def main() -> None:
    """Generate every set once and print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--smoke", action="store_true", help="severity 1 only, 4 images (for the tests)")
    args = parser.parse_args()
    if args.smoke:
        args.n = 4
    registries = Registries.collect(get_plugin_manager())
    data = registries.datasets.get("fashion-mnist").create().load("test")
    indices = torch.arange(min(args.n, len(data)))
    params = {"severities": (1,)} if args.smoke else {}
    protocol = registries.protocols.get("corruptions").create(params).resolve("smoke")
    setup = Setup(
        json.dumps(["corruptions", "fashion-mnist"]), args.batch_size, torch.device("cpu"), True, channels_last=False
    )
    seconds: dict[str, float] = {}
    total = time.perf_counter()
    for version in expand(protocol, registries, "corruption"):
        name = version.attack.corruption  # type: ignore[attr-defined]
        start = time.perf_counter()
        generate(nn.Identity(), version, Threat("corruption", 0.0), data, indices, setup)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    total = time.perf_counter() - total
    sets = len(protocol.uses)
    print(f"{len(indices)} images, {sets} sets, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {name:18s} {s:7.1f} s  {100 * s / total:5.1f} %")
    print(f"  {'total':18s} {total:7.1f} s")


if __name__ == "__main__":
    main()
