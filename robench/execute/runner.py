"""Execute a planned benchmark: build each model group once, evaluate its cells, store rows.

Together with ``registry.py`` this is the only module that calls plugin hooks. Failures
are isolated per cell: a plugin that raises yields an ``error`` row and the grid goes on.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch

import robench
from robench.cell import Cell, ModelKey
from robench.context import Progress
from robench.discover.manager import plugin_infos
from robench.discover.registry import Registries
from robench.errors import ConfigError
from robench.execute.assembly import Assembly
from robench.execute.events import Group
from robench.execute.executor import CellStarted, Executor, make_executor
from robench.execute.modelcache import ModelCache, data_fingerprint
from robench.execute.numerics import cpu_provenance
from robench.execute.session import Session
from robench.execute.versions import TransferCache
from robench.plan.config import Benchmark
from robench.plan.grid import plan, select_cells
from robench.results.flags import update_flags
from robench.results.parts import PartStore
from robench.results.storage import CellResult, RunStore


@dataclass
class Summary:
    """What a finished session reports back."""

    run_dir: Path
    results: list[CellResult]
    skipped: int

    @property
    def failed(self) -> list[CellResult]:
        """Cells stored with status ``error``."""
        return [r for r in self.results if r.status != "ok"]


def run(
    benchmark: Benchmark,
    *,
    pm: pluggy.PluginManager,
    run_dir: Path,
    cache_dir: Path,
    device: str = "auto",
    executor: Executor | None = None,
    progress: Progress | None = None,
    select: str | None = None,
    models: Path | None = None,
) -> Summary:
    """Plan, build, attack, score and store ``benchmark``; finished cells are skipped.

    :param select: only run cells whose id contains this substring
    :param models: evaluate the models stored in this folder (a model cache's ``models/``)
        and build none; :class:`~robench.errors.CacheError` before any compute if one of
        the cells' models (or their surrogates) is not there
    """
    _require_folder(run_dir, "--out", "a run folder")
    _require_folder(cache_dir, "--cache-dir", "the model cache's folder", "--cache-dir (or $ROBENCH_CACHE)")
    registries = Registries.collect(pm)
    cells = select_cells(plan(benchmark, registries), select)
    executor = executor or make_executor(benchmark.execution)  # a missing Ray fails here, before compute
    pm.hook.robench_configure(benchmark=benchmark)
    pm.hook.robench_modify_plan(benchmark=benchmark, cells=cells)
    # fail on missing data before any compute, and say which copy is used
    data = {name: registries.datasets.get(name).create().locate() for name in benchmark.datasets}
    progress = progress or Progress()
    session = Session(
        benchmark,
        registries,
        RunStore(run_dir),
        ModelCache(cache_dir, frozen=models),
        TransferCache(cache_dir),
        resolve_device(device),
        progress,
        device_request=device,
    )
    for name, where in data.items():
        progress.log(f"data: {name} from {where}")
    _check_n_samples(session)
    session.provenance = _provenance(pm, benchmark, session.device)
    done = session.store.finished(progress.log)  # damaged cell files are set aside and recomputed
    pending = [c for c in cells if c.key not in done]
    if models is not None:  # evaluate stored models only: fail before any compute if one is missing
        for key in _model_keys(session, pending):
            session.cache.require(key, data_fingerprint(session.data(key.dataset, "train")))
    _write_manifest(session, cells, data)
    progress.log(f"plan: {len(cells)} cells, {len(cells) - len(pending)} already finished in {run_dir}")
    results = [done[c.key] for c in cells if c.key in done]
    by_key = {c.key: c for c in pending}
    sizes = (benchmark.shard_size, benchmark.batch_size)
    assembly = Assembly(session, PartStore(run_dir), pending, sizes, progress.log)  # reads stored parts
    for event in executor.map(session, _groups(pending, assembly)):  # hooks here, in the driver, never in a worker
        if isinstance(event, CellStarted):
            pm.hook.robench_cell_start(cell=by_key[event.cell_key])
            continue
        result = assembly.feed(event)  # a shard is stored as a part at once; a cell when its last part is in
        if result is None:
            continue
        session.store.write(result)
        pm.hook.robench_cell_finish(cell=by_key[result.row["cell_key"]], result=result)
        results.append(result)
        progress.log(_line(result))
    _write_manifest(session, cells, data, results)
    update_flags(session.store)
    pm.hook.robench_session_finish(benchmark=benchmark, results=results)
    return Summary(run_dir, results, len(cells) - len(pending))


def _require_folder(path: Path, flag: str, what: str, setting: str = "") -> None:
    """Fail before any compute if ``path``, or a folder above it, is an existing file."""
    for folder in (path, *path.parents):
        if folder.is_dir():
            return
        if folder.exists():
            fix = f"give {setting or flag} the path of a folder (it is created if missing)"
            if folder == path:
                raise ConfigError(f"{flag} {path} is a file, but robench needs {what} there; {fix}")
            raise ConfigError(f"{flag} {path}: {folder} is a file, so {what} cannot be created under it; {fix}")


def _check_n_samples(session: Session) -> None:
    """Refuse an evaluation subset larger than a test split: it would silently shrink to the split."""
    n = session.benchmark.n_samples
    for name in session.benchmark.datasets:
        size = len(session.data(name, "test"))  # loaded once: the session keeps it for the run
        if n > size:
            raise ConfigError(
                f"--n-samples {n} is more than {name}'s {size} test images; use at most {size} "
                f"({size} evaluates the whole test split; in a benchmark file: [evaluation] n_samples)"
            )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use cpu or auto")
    return torch.device(name)


def _model_keys(session: Session, cells: Sequence[Cell]) -> list[ModelKey]:
    """Every model the cells evaluate or transfer from (surrogates), each once."""
    keys = dict.fromkeys(c.model for c in cells)
    for cell in cells:
        for surrogate in cell.protocol.surrogates:
            for seed in surrogate.seeds:
                arch = surrogate.arch or cell.model.arch
                keys[session.model_key(cell.model.dataset, arch, surrogate.defense, seed)] = None
    return list(keys)


def _groups(cells: Sequence[Cell], assembly: Assembly) -> list[Group]:
    groups: dict[ModelKey, Group] = {}
    for cell in cells:
        group = groups.setdefault(cell.model, Group(cell.model, []))
        group.cells.append(cell)
        group.todo[cell.key] = assembly.todo(cell)
    return list(groups.values())


def _provenance(pm: pluggy.PluginManager, benchmark: Benchmark, device: torch.device) -> dict[str, Any]:
    plugins = {name: f"{i.dist}=={i.version}" for name, i in sorted(plugin_infos(pm).items())}
    return {
        "robench_version": robench.__version__,
        "plugins": json.dumps(plugins, sort_keys=True),
        "torch_version": torch.__version__,
        "device": str(device),
        **cpu_provenance(),
        "git_revision": _git_revision(),
        "config_hash": benchmark.config_hash(),
    }


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _write_manifest(
    session: Session, cells: list[Cell], data: dict[str, str], results: Sequence[CellResult] = ()
) -> None:
    # a stored row read back has NaN, not "", where an older robench wrote no engine
    engines = {r.cell_id: e for r in results if isinstance(e := r.row.get("quantized_engine"), str) and e}
    listed = {c.key: c.id for c in cells}
    models = {c.model.digest(): c.model.defense_label for c in cells}
    try:  # a run with -k into an existing folder adds to what the folder already lists
        previous = session.store.read_manifest()
    except (FileNotFoundError, ValueError):  # none yet (or unreadable: then this one replaces it)
        previous = {}
    listed = {**{c["key"]: c["id"] for c in previous.get("cells", [])}, **listed}
    session.store.write_manifest(
        {
            "benchmark": session.benchmark.to_json(),
            "provenance": session.provenance,
            "cells": [{"key": key, "id": cell_id} for key, cell_id in listed.items()],
            "eval_indices": {d: session.eval_indices(d).tolist() for d in session.benchmark.datasets},
            "data": {**previous.get("data", {}), **data},  # dataset -> the folder it was read from, and why
            "models": {**previous.get("models", {}), **models},
            "quantized_engines": {**previous.get("quantized_engines", {}), **engines},  # int8 kernels, by cell id
        }
    )


def _line(result: CellResult) -> str:
    r = result.row
    if result.status != "ok":
        return f"FAILED {r['cell_id']}: {r['error']}"
    return (
        f"done {r['cell_id']}: clean {100 * r['clean_acc']:.1f}%  robust {100 * r['robust_acc']:.1f}% "
        f"[{100 * r['robust_ci_low']:.1f}, {100 * r['robust_ci_high']:.1f}]  n={r['n']}  {_checks_text(r)}"
    )


def _checks_text(row: dict[str, Any]) -> str:
    """``checks ok, indicators ok (0.4 % of the cell)`` or what fired, and what found masked gradients."""
    spent = row["check_seconds"] + row["indicator_seconds"]  # model checks and attack-failure indicators
    share = spent / max(spent + row["attack_seconds"], 1e-9)
    text = f"checks {row['checks']}, indicators {row['indicators']} ({100 * share:.1f} % of the cell)"
    if row["masking_found_by"]:
        found = json.loads(row["masking_found_by"])
        text += "; masking found by " + ", ".join(f"{use} ({n} samples)" for use, n in found.items())
    return text
