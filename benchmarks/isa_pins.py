"""Do the CPU's instruction set and the ISA pins change robench's numbers, and at what speed?

Runs ``benchmarks/ci.toml`` (training and evaluation, fresh model cache each time) once per
setting of the environment variables that pin the instruction set the math libraries
dispatch to (ATen's ``ATEN_CPU_CAPABILITY``, oneDNN's ``ONEDNN_MAX_CPU_ISA``, MKL's
``MKL_CBWR``), each in its own process (the libraries read them once, at start), then prints
per setting: wall time and its ratio to the unpinned run, the sha256 of every trained model,
whether each is bit-identical to the unpinned run's, and every cell's accuracies.

On one machine this shows which library's ISA choice moves the numbers and what pinning
costs. Whether a pinned setting gives the same bits on two *different* CPUs can only be seen
by running this script on both and comparing the printed model hashes; the README's
"Regression checks" says what robench's CI gate relies on instead. Usage::

    python benchmarks/isa_pins.py [--settings native,low,avx2] [--threads 2]

``--smoke`` runs the settings native and aten-default on a tiny grid (for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from robench.execute.numerics import cpu_capability
from robench.results.storage import RunStore

HERE = Path(__file__).resolve().parent
SMOKE_GRID = """
name = "isa-smoke"
[grid]
defense = [{ name = "baseline", train_subset = 256, epochs = 1 }]
attack = [{ name = "pgd", steps = 2, restarts = 1 }]
[evaluation]
n_samples = 8
"""

SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    # the lowest ISA each library offers on x86-64 (SSE4.1/SSE2-class code paths)
    "low": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
    # AVX2, the most any x86-64 CPU robench supports is sure to have
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    # one library at a time, to see which one matters
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
}


@dataclass
class Outcome:
    """One setting's run: wall seconds, model sha256 by defense, its cells table."""

    seconds: float
    models: dict[str, str]
    cells: pd.DataFrame


def run_setting(name: str, pins: dict[str, str], scratch: Path, threads: int, grid: Path) -> Outcome:
    """Run the ``grid`` file under ``pins``; its time, model hashes and cells."""
    out, cache = scratch / name, scratch / f"{name}-cache"
    env = {**os.environ, **pins, "OMP_NUM_THREADS": str(threads)}
    # the robench of this interpreter (a virtual environment's, if it runs in one)
    cmd = [sys.executable, "-m", "robench", "run", str(grid), "--out", str(out), "--cache-dir", str(cache)]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    models = {}
    for meta in sorted(cache.glob("models/*/meta.json")):
        data = json.loads(meta.read_text())
        models[data["key"]["defense_label"].split("[")[0]] = data["files"]["model"][:12]
    return Outcome(seconds, models, RunStore(out).read_cells().sort_values("cell_id"))


def main() -> None:
    """Run each setting and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="native,low,avx2", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="native and aten-default on a tiny grid (tests)")
    args = parser.parse_args()
    names = ["native", "aten-default"] if args.smoke else args.settings.split(",")
    if names[0] != "native" or any(n not in SETTINGS for n in names):
        sys.exit(f"--settings must start with native and use only {', '.join(SETTINGS)}")
    scratch = Path(tempfile.mkdtemp(prefix="robench-isa-"))
    grid = HERE / "ci.toml"
    if args.smoke:
        grid = scratch / "isa-smoke.toml"
        grid.write_text(SMOKE_GRID)
    print(f"CPU capability (unpinned): {cpu_capability()}; threads {args.threads}")
    results = {n: run_setting(n, SETTINGS[n], scratch, args.threads, grid) for n in names}
    native = results["native"]
    rows = []
    for name, r in results.items():
        cells = r.cells
        accs = " ".join(
            f"{100 * c:.1f}/{100 * a:.1f}" for c, a in zip(cells["clean_acc"], cells["robust_acc"], strict=True)
        )
        rows.append(
            {
                "setting": name,
                "pins": " ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) or "-",
                "dispatched": cells["cpu_capability"].iloc[0],
                "seconds": round(r.seconds, 1),
                "time ratio": round(r.seconds / native.seconds, 2),
                "models (sha256)": " ".join(f"{d}:{h}" for d, h in r.models.items()),
                "bit-identical to native": r.models == native.models,
                "clean/robust per cell": accs,
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"cells, in cell_id order: {list(native.cells['cell_id'])}")
    print(f"run folders (robench check them against a baseline): {scratch}/<setting>")


if __name__ == "__main__":
    main()
