"""What decides CPU float numbers besides the code: the instruction set torch's kernels
dispatched to, the environment variables that pin it, and the thread count.

CPU float results differ between processors: ATen's vectorised kernels, oneDNN and MKL pick
AVX2 or AVX-512 code paths at run time, with other summation orders and FMA use, and a
training run amplifies the difference into another model. Every row and manifest records
these facts (:func:`cpu_provenance`) so that two tables that differ for this reason can be
told apart, and ``robench check`` names them when a baseline came from another ISA.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import torch

# Environment variables that pin the ISA or the numerics of the CPU math libraries; they
# are read when each library first runs, so they must be set before the process starts.
PIN_VARIABLES = (
    "ATEN_CPU_CAPABILITY",  # ATen's vectorised kernels: default, avx2, avx512, ...
    "ONEDNN_MAX_CPU_ISA",  # oneDNN (convolutions): SSE41, AVX2, AVX512_CORE, ...
    "DNNL_MAX_CPU_ISA",  # the same, older spelling
    "MKL_CBWR",  # MKL's conditional numerical reproducibility: COMPATIBLE, AVX2, ... (,STRICT)
    "MKL_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
)


def cpu_capability() -> str:
    """The instruction set ATen dispatches its CPU kernels to, e.g. ``AVX2`` or ``AVX512``."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_pins() -> dict[str, str]:
    """The pin variables (:data:`PIN_VARIABLES`) set in this process's environment."""
    return {name: os.environ[name] for name in PIN_VARIABLES if name in os.environ}


def cpu_provenance() -> dict[str, object]:
    """The provenance columns ``cpu_capability``, ``cpu_pins`` and ``threads``."""
    return {
        "cpu_capability": cpu_capability(),
        "cpu_pins": json.dumps(cpu_pins(), sort_keys=True),
        "threads": torch.get_num_threads(),
    }


MACHINE_COLUMNS = {
    "cpu_capability": "CPU capability",
    "cpu_pins": "ISA pins",
    "threads": "threads",
    "quantized_engine": "int8 engine",
    "device": "device",
}
"""Provenance columns that change numbers without any change of code."""


def machine_notes(run: pd.DataFrame, baseline: pd.DataFrame) -> tuple[str, ...]:
    """A note per machine fact (:data:`MACHINE_COLUMNS`) that differs between the two runs."""

    def values(table: pd.DataFrame, column: str) -> str:
        if column not in table:
            return "not recorded"
        found = sorted({str(v) for v in table[column].dropna() if str(v) not in ("", "{}")})
        return ", ".join(found) or ("not recorded" if table[column].isna().all() else "none")

    notes = []
    for column, label in MACHINE_COLUMNS.items():
        old, new = values(baseline, column), values(run, column)
        if old != new and {old, new} != {"none", "not recorded"}:  # nothing set, or nothing known: no news
            notes.append(f"{label}: baseline {old}, run {new}")
    if notes:
        notes.append(
            "float kernels differ between CPUs and thread counts: models trained on each differ (check them "
            "with a tolerance from the seed spread); stored models evaluated with --models agree to a few samples"
        )
    return tuple(notes)
