"""Common-corruption cells: the corrupted copies of the evaluation subset, cached, and their scores.

A ``corruptions`` protocol (``Protocol.norm == "corruption"``) has one use per (corruption,
severity), each from :data:`~robench.protocol.CLEAN_SOURCE`. The engine scores those uses
exactly like transfer versions: it asks the cell's transfer source for the whole set, and
the source hands the request to :func:`corrupted_set`, which

* reads the released CIFAR-10-C / CIFAR-100-C arrays when ``$ROBENCH_DATA`` holds them (for
  the test indices the cell evaluates), else
* loads the set from the :class:`CorruptionCache`, checked against its key and content hash,
  else generates it once from the clean images (per-sample keys that depend on the dataset,
  the corruption and the sample index only, never on the batch, the subset or the model) and
  stores it for every later defense.

Sets are stored as uint8, truncated as CIFAR-10-C's generator does. A corruption cell runs every version on every
sample (no early exit): its ``robust_acc`` is RobustBench's corruption accuracy, the mean
accuracy over the sets (:func:`corruption_columns`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from robench.cell import Cell
from robench.context import ImageData, Progress, Threat
from robench.corruption import SEVERITIES, STANDARD_CORRUPTIONS, Corruption
from robench.errors import DataNotFoundError
from robench.execute.engine import Outcome, Setup, generate
from robench.execute.keyedfiles import KeyedFiles
from robench.execute.modelcheck import ModelChecks
from robench.execute.versions import TransferCache, Version
from robench.protocol import Protocol as EvalProtocol

RELEASED_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
"""Dataset -> the folder name of its released corruption arrays under ``$ROBENCH_DATA``."""

GENERATOR_REVISION = 2
"""Part of every generated set's cache key: bumped whenever the generated images change, so a
set made by an older generator is never reused. 2: zoom_blur's zoom factors as the reference's
``np.arange`` gives them, motion blur and snow quantised as ImageMagick's 8-bit output, uint8
by truncation (1: rounding)."""

_Z = 1.959963984540054  # two-sided 95 % normal quantile


class _Session(Protocol):
    @property
    def transfer_cache(self) -> TransferCache: ...

    @property
    def progress(self) -> Progress: ...


class SetSource(Protocol):
    """What :func:`corrupted_set` needs of the cell's transfer source (transfersource.py)."""

    seconds: float
    generated: int  # sets this cell produced (its ``transfer_generated`` column)

    @property
    def session(self) -> _Session:
        """The session: its transfer cache's root holds the corruption cache; its progress logs."""

    @property
    def cell(self) -> Cell:
        """The cell being evaluated."""

    @property
    def data(self) -> ImageData:
        """The test split."""

    @property
    def indices(self) -> Tensor:
        """The evaluation subset."""

    @property
    def setup(self) -> Setup:
        """The cell's setup (its batch size is used for generation)."""

    @property
    def used(self) -> list[str]:
        """The set names the cell used (its ``transfer_sets`` column)."""


class CorruptionCache:
    """Corrupted copies of evaluation subsets, on disk under ``<root>/corruptions/`` (uint8 NCHW).

    A file holds its key and the sha256 of its images; :meth:`get` rejects a file whose key,
    shape, dtype or content does not match, so an edited or truncated set is regenerated,
    never scored.
    """

    def __init__(self, root: Path) -> None:
        self.files = KeyedFiles(Path(root) / "corruptions")
        self.root = self.files.root

    def get(self, key: dict[str, object], shape: tuple[int, ...]) -> Tensor | None:
        """The stored images for ``key`` if present and intact, else ``None``."""
        stored = self.files.load(key)
        images = None if stored is None else stored.get("images")
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape:
            return None
        return images if stored is not None and stored.get("sha256") == _sha(images) else None

    def put(self, key: dict[str, object], images: Tensor) -> None:
        """Store atomically (a concurrent writer of the same key writes the same bytes)."""
        images = images.contiguous()
        self.files.save(key, {"images": images, "sha256": _sha(images)})

    def name(self, key: dict[str, object]) -> str:
        """The file name of ``key``'s set (recorded in the cell's ``transfer_sets``)."""
        return self.files.name(key)

    def path(self, key: dict[str, object]) -> Path:
        """Where ``key``'s set is stored."""
        return self.files.path(key)


def released_folder(dataset: str) -> Path | None:
    """``$ROBENCH_DATA/CIFAR-10-C`` (or ``CIFAR-100-C``) if it exists for ``dataset``, else ``None``."""
    base = os.environ.get("ROBENCH_DATA")
    if not base or dataset not in RELEASED_FOLDERS:
        return None
    folder = Path(base) / RELEASED_FOLDERS[dataset]
    return folder if (folder / "labels.npy").exists() else None


def load_released(folder: Path, corruption: str, severity: int, indices: Tensor, labels: Tensor) -> Tensor:
    """The released images of ``corruption`` at ``severity`` for test ``indices`` (uint8 NCHW).

    The released layout: ``<corruption>.npy`` of shape (5 * n, H, W, C) uint8, severity s in
    rows ``(s - 1) * n`` to ``s * n`` in test-split order, and ``labels.npy``. The labels of
    the requested rows must equal the test split's, so a folder of another dataset or order
    is refused rather than scored.
    """
    path = folder / f"{corruption}.npy"
    if not path.exists():
        raise DataNotFoundError(f"{folder} has no {path.name}; it holds {sorted(p.name for p in folder.glob('*.npy'))}")
    images = np.load(path, mmap_mode="r")
    n = len(labels)
    if images.ndim != 4 or images.shape[0] != len(SEVERITIES) * n or images.dtype != np.uint8:
        raise DataNotFoundError(
            f"{path}: expected uint8 (5 x {n}, H, W, C) images for a {n}-image test split, found "
            f"{images.dtype} {images.shape}"
        )
    rows = (severity - 1) * n + indices.numpy()
    stored = torch.from_numpy(np.load(folder / "labels.npy", mmap_mode="r")[rows].astype(np.int64))
    if not torch.equal(stored, labels[indices]):
        raise DataNotFoundError(f"{folder}/labels.npy does not match the test split's labels: not this dataset's")
    return torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2).contiguous()


def corrupted_set(source: SetSource, version: Version) -> Tensor:
    """The corrupted copies (float in [0, 1]) of ``version`` for the source's evaluation subset."""
    attack = version.attack
    if not isinstance(attack, Corruption):
        raise TypeError(f"use {version.label} of a corruption protocol is not a corruption plugin")
    started = time.perf_counter()
    data, indices, progress = source.data, source.indices, source.session.progress
    folder = released_folder(source.cell.model.dataset) if attack.corruption in STANDARD_CORRUPTIONS else None
    if folder is not None and attack.severity in SEVERITIES:
        images = load_released(folder, attack.corruption, attack.severity, indices, data.labels)
        source.used.append(f"{folder.name}/{attack.corruption}.npy#{attack.severity}")
    else:
        images = _cached_or_generated(source, version, attack, progress)
    source.seconds += time.perf_counter() - started
    return images.float().div_(255)


def _cached_or_generated(source: SetSource, version: Version, attack: Corruption, progress: Progress) -> Tensor:
    cache = CorruptionCache(source.session.transfer_cache.root.parent)
    key: dict[str, object] = {
        "dataset": source.cell.model.dataset,
        "indices": hashlib.sha256(source.indices.numpy().tobytes()).hexdigest()[:16],
        "version": version.key(),
        "generator": GENERATOR_REVISION,
    }
    shape = (len(source.indices), *source.data.images.shape[1:])
    images = cache.get(key, shape)
    if images is None:
        progress.log(f"generating corruption set {attack.corruption}/{attack.severity} ({shape[0]} images)")
        setup = Setup(
            key=json.dumps(["corruptions", source.cell.model.dataset]),  # not the model's seed: one test distribution
            batch_size=source.setup.batch_size,
            device=torch.device("cpu"),  # numpy/PIL/numba kernels
            exhaustive=True,
            channels_last=False,
        )
        x = generate(nn.Identity(), version, Threat("corruption", 0.0), source.data, source.indices, setup)
        # stored as CIFAR-10-C is: 8-bit images, truncated (make_cifar_c.py's np.uint8 of 255 * image),
        # not rounded (half a grey level brighter on average)
        images = x.mul(255).floor_().to(torch.uint8)
        cache.put(key, images)
        source.generated += 1
    elif version.index == 0:
        progress.log(
            f"corruption sets of {source.cell.model.dataset} ({shape[0]} images): reusing the cache in {cache.root}"
        )
    source.used.append(cache.name(key))
    return images


def without_gradient_checks(checks: ModelChecks, protocol: EvalProtocol) -> ModelChecks:
    """For a corruption cell, the model checks with the input-gradient check marked not
    applicable (NaN): no gradient attack runs, so vanishing gradients mask nothing and must
    neither flag the cell nor add transfer and Square versions to it (nor, without a gradient
    path, skip any version)."""
    return replace(checks, vanishing_share=float("nan"), no_gradient="") if protocol.is_corruption() else checks


CORRUPTION_COLUMNS = (
    "corruption_acc",
    "corruption_worst",
    "corruption_worst_acc",
    *(f"corruption_s{s}_acc" for s in SEVERITIES),
    "corruption_table",
)
"""The corruption columns of the cells table (documented in robench/results/storage.py)."""


def corruption_columns(protocol: EvalProtocol, versions: list[Version], out: Outcome) -> dict[str, Any]:
    """The corruption columns of a cell's row, and for a corruption cell its ``robust_acc``.

    ``robust_acc`` of a corruption cell is RobustBench's corruption accuracy, the plain
    accuracy averaged over every (corruption, severity) set (not all-or-nothing: no sample
    survives 75 corruptions at once on a compact model, and RobustBench does not ask it to).
    Its interval is the normal one over samples of each sample's share of sets classified
    correctly, since the sets of one sample are not independent draws.
    """
    if not protocol.is_corruption():  # strings empty, numbers null: as other not-applicable columns
        return {name: "" if name in ("corruption_worst", "corruption_table") else None for name in CORRUPTION_COLUMNS}
    table: dict[str, dict[int, float]] = {}
    for version, correct in zip(versions, out.versions, strict=True):
        attack = version.attack
        assert isinstance(attack, Corruption)
        table.setdefault(attack.corruption, {})[attack.severity] = float(correct.float().mean())
    per_sample = torch.stack(out.versions).float().mean(dim=0) if out.versions else torch.zeros(0)
    mean = float(per_sample.mean()) if len(per_sample) else float("nan")
    half = _Z * float(per_sample.std()) / max(len(per_sample), 1) ** 0.5 if len(per_sample) > 1 else 0.0
    by_corruption = {name: sum(accs.values()) / len(accs) for name, accs in table.items()}
    worst = min(by_corruption, key=lambda name: by_corruption[name]) if by_corruption else ""
    columns: dict[str, Any] = {
        "robust_acc": mean,
        "robust_ci_low": max(0.0, mean - half),
        "robust_ci_high": min(1.0, mean + half),
        "corruption_acc": mean,
        "corruption_worst": worst,
        "corruption_worst_acc": by_corruption.get(worst),
        "corruption_table": json.dumps({name: [accs[s] for s in sorted(accs)] for name, accs in table.items()}),
    }
    for s in SEVERITIES:
        accs = [row[s] for row in table.values() if s in row]
        columns[f"corruption_s{s}_acc"] = sum(accs) / len(accs) if accs else None
    return columns


def _sha(images: Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
