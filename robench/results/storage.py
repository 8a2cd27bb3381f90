"""The results schema, and the only code that writes or reads a run folder.

A run folder (``results/<run>/``) holds:

* ``cells/<cell key>.parquet``: one row per finished cell (schema :data:`CELL_SCHEMA`);
* ``samples/<cell key>.parquet``: per-sample outcomes of that cell (:data:`SAMPLE_SCHEMA`);
* ``manifest.json``: the resolved benchmark, the evaluation subset and the model hashes.

Each file is written to a hidden temporary name and renamed into place, so a crash never
leaves a half-written file that looks finished; pyarrow ignores hidden files when it reads
the folder as one dataset. A cell counts as finished once its ``cells/`` file exists; the
samples file is written first.

A file damaged afterwards (a copy cut short, a full disk) must not block the whole folder:
readers skip it with a :class:`DamagedFileWarning`, and resuming (:meth:`RunStore.finished`)
moves it aside as ``_<key>.parquet.damaged`` and recomputes its cell. The ``.damaged``
suffix keeps it out of robench's ``*.parquet`` reader, the leading underscore out of
pyarrow's (and Spark's) when they read the folder as one dataset.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robench.errors import DamagedFileWarning
from robench.results.atomicfiles import atomic_bytes, atomic_parquet

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Schema versions this robench reads. Version 2 added the corruption columns (nullable; a
version-1 file reads with them null) and the ``corruption`` norm; version 3 the no-gradient-path,
BPDA and attack-failure indicator columns (null in older files): older folders stay readable."""

# name, type, meaning: the schema is written down once, here.
_CELL_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("schema_version", pa.int32(), "version of this schema"),
    ("cell_key", pa.string(), "content hash of everything that determines the cell (file name)"),
    ("cell_id", pa.string(), "readable id: dataset/arch/defense/variant/attack/norm/eps/seed"),
    ("dataset", pa.string(), "dataset plugin name"),
    ("arch", pa.string(), "architecture plugin name"),
    ("defense", pa.string(), "defense plugin name"),
    ("defense_params", pa.string(), "resolved defense parameters (preset + user), canonical JSON"),
    ("preset", pa.string(), "preset the defense parameters came from: smoke or paper"),
    ("variant", pa.string(), "which of the defense's models was evaluated"),
    ("protocol", pa.string(), "protocol name (an --attack NAME run is the one-attack protocol NAME)"),
    ("protocol_spec", pa.string(), "the resolved protocol: uses, attack parameters, surrogates; canonical JSON"),
    ("protocol_revision", pa.int32(), "revision of the protocol definition (bumped when numbers would move)"),
    ("transfer", pa.bool_(), "true if any version attacks a surrogate (black-box transfer)"),
    ("norm", pa.string(), "threat norm: linf, l2, or corruption (common corruptions: no radius, eps 0)"),
    ("eps", pa.float64(), "threat radius in [0, 1] pixel units (0 for corruption cells)"),
    ("seed", pa.int64(), "seed of the model build (training) and of the attack's random starts"),
    ("status", pa.string(), "ok, or error (then error holds the message)"),
    ("error", pa.string(), "error text for status=error, else empty"),
    ("n", pa.int64(), "number of evaluated samples"),
    ("sample_seed", pa.int64(), "seed of the random evaluation subset of the test split"),
    ("clean_acc", pa.float64(), "accuracy on clean inputs"),
    # corruption cells: robust_acc is RobustBench's corruption accuracy (the mean over the sets), not all-or-nothing
    ("robust_acc", pa.float64(), "all-or-nothing accuracy: correct clean and under every version (corruption: mean)"),
    # corruption cells: a normal interval over samples of each sample's share of sets classified correctly
    ("robust_ci_low", pa.float64(), "Wilson 95% interval of robust_acc, low end (corruption: normal, see above)"),
    ("robust_ci_high", pa.float64(), "Wilson 95% interval of robust_acc, high end"),
    ("n_versions", pa.int64(), "number of attack versions (restarts) in the protocol"),
    ("exhaustive", pa.bool_(), "true if every version ran on every sample (no early exit)"),
    ("randomized", pa.bool_(), "true if the variant was evaluated as randomized: declared, or found by the checks"),
    ("eot", pa.int32(), "randomized variants: softmax draws averaged for gradient attacks (EOT); else 0"),
    ("votes", pa.int32(), "predictions per verdict: a majority of `votes` draws decides (1 if deterministic)"),
    ("params", pa.int64(), "number of model parameters"),
    ("nonzero_params", pa.int64(), "number of non-zero parameters"),
    ("bits", pa.int32(), "bits per stored weight"),
    ("model_bytes", pa.int64(), "weight storage: params * bits / 8, or the variant's sparse size (its encoding)"),
    ("macs", pa.int64(), "multiply-accumulates per image (conv and linear layers)"),
    ("latency_ms", pa.float64(), "median wall time of one single-image forward pass on `device`"),
    ("build_seconds", pa.float64(), "seconds spent training/compressing the model (0 when cached)"),
    ("attack_seconds", pa.float64(), "seconds spent evaluating the cell (attacks and scoring)"),
    ("transfer_seconds", pa.float64(), "part of attack_seconds spent loading or generating transfer sets"),
    ("gradient_calls", pa.int64(), "sample-level forward passes with gradients through the attacked model"),
    ("queries", pa.int64(), "all sample-level forward passes through the attacked model during attacks"),
    ("versions", pa.string(), "JSON list of version labels; samples.version indexes it"),
    ("transfer_sets", pa.string(), "JSON list of the cached transfer-set (or corruption-set) files this cell used"),
    ("transfer_generated", pa.int64(), "how many of transfer_sets this cell generated (0: all read from the cache)"),
    ("flag_loss_not_increasing", pa.bool_(), "sanity: white-box attacks left the mean loss below the clean loss"),
    ("flag_eps_not_monotonic", pa.bool_(), "sanity: robust accuracy rises with eps (same model, protocol)"),
    ("flag_whitebox_above_transfer", pa.bool_(), "sanity: white-box accuracy above transfer accuracy, same eps"),
    ("flag_large_eps_survives", pa.bool_(), "sanity: linf eps >= 0.5 leaves robust accuracy above 20%"),
    ("flag_randomized_without_eot", pa.bool_(), "sanity: a randomized variant attacked without EOT"),
    ("checks", pa.string(), "model checks run before the attack: 'ok', or the checks that fired, comma-separated"),
    ("check_samples", pa.int32(), "evaluation samples the model checks ran on (the first of the subset)"),
    ("check_seconds", pa.float64(), "seconds the model checks took (not part of attack_seconds)"),
    ("check_randomized", pa.bool_(), "check: repeated predictions on the same inputs differed (declared or not)"),
    ("flag_undeclared_randomness", pa.bool_(), "check: undeclared random prediction; evaluated as randomized"),
    ("flag_probability_outputs", pa.bool_(), "check: outputs are probabilities (>= 0, sum 1); attacks got their log"),
    ("check_vanishing_share", pa.float64(), "check: share of check samples with zero or vanishing input gradient"),
    ("flag_vanishing_gradients", pa.bool_(), "check: vanishing input gradients; transfer and Square versions added"),
    ("masking_found_by", pa.string(), "JSON: added use -> samples it fooled that the protocol's versions missed"),
    ("flag_batch_dependent", pa.bool_(), "check: a sample's prediction changes with the rest of its batch"),
    ("flag_no_gradient_path", pa.bool_(), "check: output not differentiable in the input; gradient versions skipped"),
    (
        "no_gradient_reason",
        pa.string(),
        "check: why there is no gradient path (no grad_fn, None gradient, ...); else empty",
    ),
    ("skipped_versions", pa.string(), "JSON list of version labels not run (gradient attacks, no gradient path)"),
    (
        "bpda",
        pa.string(),
        "gradient attacks crossed a declared preprocess by BPDA: identity or substitute X; else empty",
    ),
    # indicators of attack failure (Pintor et al. 2022) on the check samples: robench/execute/indicators.py
    ("indicators", pa.string(), "indicators of attack failure that fired, comma-separated; 'ok'; 'n/a' (corruption)"),
    ("indicator_attack", pa.string(), "the white-box version whose path and unbounded run indicators 1, 2, 6 measured"),
    ("indicator_silent_success", pa.float64(), "1: share of attacked check samples fooled on the path, not at its end"),
    ("indicator_incomplete_optimization", pa.float64(), "2: share of samples not fooled whose loss still moved"),
    (
        "indicator_transfer_failure",
        pa.float64(),
        "3: share of transfer examples fooling their surrogate, not the model",
    ),
    ("indicator_unavailable_gradients", pa.bool_(), "4: no gradient path, or a vanishing input gradient on any sample"),
    ("indicator_unstable_predictions", pa.float64(), "5: mean relative loss change under noise of width 8/255, max 1"),
    (
        "indicator_unconstrained_failure",
        pa.float64(),
        "6: share of correct check samples the attack without eps misses",
    ),
    ("indicator_seconds", pa.float64(), "seconds the indicators took (recording the path: also in attack_seconds)"),
    ("robench_version", pa.string(), "robench version"),
    ("plugins", pa.string(), "JSON of plugin -> distribution==version for every loaded plugin"),
    ("torch_version", pa.string(), "torch version"),
    ("device", pa.string(), "device the cell ran on"),
    ("cpu_capability", pa.string(), "CPU instruction set torch's kernels dispatched to (AVX2, AVX512, ...)"),
    ("cpu_pins", pa.string(), "JSON of the ISA/numerics environment pins in force (ATEN_CPU_CAPABILITY, ...)"),
    ("threads", pa.int32(), "torch CPU threads (float sums, and so CPU numbers, depend on it)"),
    ("quantized_engine", pa.string(), "int8 variants: the quantized kernels' engine (qnnpack, x86, ...); else empty"),
    ("git_revision", pa.string(), "git revision of the working directory, if any"),
    ("config_hash", pa.string(), "hash of the benchmark configuration"),
    ("model_hash", pa.string(), "content hash of the model key (model cache directory)"),
    ("weights_sha256", pa.string(), "models loaded from a file (checkpoint, model zoo): the file's sha256; else empty"),
    ("variant_config", pa.string(), "JSON architecture configuration the defense chose for the variant (ProARD)"),
    ("started_at", pa.timestamp("us", tz="UTC"), "when the cell's evaluation started"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "when it finished"),
    # corruption cells only (protocol `corruptions`, norm `corruption`); null for every other cell
    ("corruption_acc", pa.float64(), "corruption: mean accuracy over every (corruption, severity) set (= robust_acc)"),
    ("corruption_worst", pa.string(), "corruption: the corruption of lowest accuracy over its severities (else empty)"),
    ("corruption_worst_acc", pa.float64(), "corruption: that corruption's accuracy averaged over severities"),
    ("corruption_s1_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 1"),
    ("corruption_s2_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 2"),
    ("corruption_s3_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 3"),
    ("corruption_s4_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 4"),
    ("corruption_s5_acc", pa.float64(), "corruption: mean accuracy over the corruptions at severity 5"),
    ("corruption_table", pa.string(), "corruption: JSON corruption -> accuracy per severity, in order (else empty)"),
]

_SAMPLE_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("cell_key", pa.string(), "the cell (joins cells.cell_key)"),
    ("sample", pa.int64(), "index of the sample in the dataset's test split"),
    ("version", pa.int32(), "-1 for the clean input, else the version (corruption: set) index in cells.versions"),
    ("correct", pa.bool_(), "whether the model classified this input correctly"),
]


def _schema(columns: list[tuple[str, pa.DataType, str]]) -> pa.Schema:
    fields = [pa.field(n, t, metadata={"doc": d}) for n, t, d in columns]
    return pa.schema(fields, metadata={"robench_schema_version": str(SCHEMA_VERSION)})


CELL_SCHEMA = _schema(_CELL_COLUMNS)
SAMPLE_SCHEMA = _schema(_SAMPLE_COLUMNS)


@dataclass
class CellResult:
    """A finished (or failed) cell: its row and its per-sample outcomes. Picklable."""

    row: dict[str, Any]
    samples: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``ok`` or ``error``."""
        return str(self.row["status"])

    @property
    def cell_id(self) -> str:
        """The cell's readable id."""
        return str(self.row["cell_id"])


@dataclass(frozen=True)
class DamagedFile:
    """A file of a run folder that pyarrow cannot read, and why."""

    path: Path
    problem: str
    """The reader's error in one line, e.g. ``ArrowInvalid: Parquet magic bytes not found in footer...``."""

    @property
    def key(self) -> str:
        """The key of the cell the file belongs to (its name)."""
        return self.path.name.removesuffix(".parquet")

    def describe(self) -> str:
        """``damaged cell file PATH (PROBLEM)``, or ``damaged samples file ...``."""
        kind = "cell" if self.path.parent.name == "cells" else "samples"
        return f"damaged {kind} file {self.path} ({self.problem})"


TableName = Literal["cells", "samples"]


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def finished(self, report: Callable[[str], None] | None = None) -> dict[str, CellResult]:
        """Cells already stored with status ok, by cell key (these are skipped on resume).

        A damaged cell or samples file is moved aside (``_<key>.parquet.damaged``) and its
        cell left out, so the run recomputes it; ``report`` gets one line per file (default:
        a :class:`DamagedFileWarning`).
        """
        if not (self.path / "cells").is_dir():
            return {}
        say = report or _warn
        table, damaged = self.read_table("cells")
        damaged += self.read_table("samples")[1]
        unfinished = set()
        for file in damaged:
            say(f"{file.describe()}: moved to {set_aside(file.path).name}; the cell will be recomputed")
            unfinished.add(file.key)
        ok = table[(table["status"] == "ok") & ~table["cell_key"].isin(unfinished)]
        done = {str(row["cell_key"]): CellResult({str(k): v for k, v in row.items()}) for row in ok.to_dict("records")}
        for key in self._samples_set_aside(done):  # an earlier resume moved them, then stopped before recomputing
            say(f"samples file of cell {done[key].cell_id} was set aside as damaged; the cell will be recomputed")
            del done[key]
        return done

    def _samples_set_aside(self, keys: Iterable[str]) -> list[str]:
        """The keys whose samples file is absent because it was moved aside as damaged."""
        folder = self.path / "samples"
        return [
            key
            for key in keys
            if not (folder / f"{key}.parquet").exists() and (folder / f"_{key}.parquet.damaged").exists()
        ]

    def write(self, result: CellResult) -> Path:
        """Store one cell atomically: samples first, then the row that marks it finished.

        :raises ValueError: if the row or the samples do not match the schema (see
            :func:`check_row`): a bug in the code that made them, never silently stored
        """
        check_row(result)
        key = result.row["cell_key"]
        samples = result.samples or {name: [] for name in SAMPLE_SCHEMA.names}
        atomic_parquet(pa.Table.from_pydict(samples, schema=SAMPLE_SCHEMA), self.path / "samples" / f"{key}.parquet")
        row = {name: [result.row.get(name)] for name in CELL_SCHEMA.names}
        row["schema_version"] = [SCHEMA_VERSION]
        target = self.path / "cells" / f"{key}.parquet"
        atomic_parquet(pa.Table.from_pydict(row, schema=CELL_SCHEMA), target)
        return target

    def read_cells(self) -> pd.DataFrame:
        """Every stored cell as one table; a damaged file is skipped with a :class:`DamagedFileWarning`."""
        return _warned(self.read_table("cells"))

    def read_samples(self) -> pd.DataFrame:
        """Every stored per-sample outcome as one table; damaged files are skipped, as by :meth:`read_cells`."""
        return _warned(self.read_table("samples"))

    def read_table(self, name: TableName) -> tuple[pd.DataFrame, list[DamagedFile]]:
        """The ``cells`` or ``samples`` table, and the files skipped because they cannot be read."""
        return _read_folder(self.path / name, CELL_SCHEMA if name == "cells" else SAMPLE_SCHEMA)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest.json`` atomically."""
        data = json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2, sort_keys=True, default=str)
        atomic_bytes(data.encode(), self.path / "manifest.json")

    def rewrite_cells(self, table: pd.DataFrame) -> None:
        """Store updated rows (e.g. sanity flags) of finished cells, each atomically."""
        for row in table.to_dict("records"):
            data = {name: [row.get(name)] for name in CELL_SCHEMA.names}
            target = self.path / "cells" / f"{row['cell_key']}.parquet"
            atomic_parquet(pa.Table.from_pydict(data, schema=CELL_SCHEMA), target)

    def read_manifest(self) -> dict[str, Any]:
        """The run's manifest."""
        manifest: dict[str, Any] = json.loads((self.path / "manifest.json").read_text())
        return manifest


CROSS_CELL_FLAGS = (
    "flag_eps_not_monotonic",
    "flag_whitebox_above_transfer",
    "flag_large_eps_survives",
    "flag_randomized_without_eot",
)
"""Flags that compare cells: set over the whole folder after a run (robench/results/flags.py), so a
row is written without them."""
ERROR_ROW_COLUMNS = frozenset({"cell_key", "cell_id", "status", "error", "started_at", "finished_at"})
"""What an ``error`` row must hold at least; its measurements stay null."""


def check_row(result: CellResult) -> None:
    """Raise ``ValueError`` unless ``result`` matches the schema: no column the schema lacks, every
    column for an ``ok`` row (but ``schema_version``, which :meth:`RunStore.write` sets, and
    :data:`CROSS_CELL_FLAGS`), at least
    :data:`ERROR_ROW_COLUMNS` for an ``error`` row, and samples with exactly the samples columns."""
    names = set(CELL_SCHEMA.names)
    unknown = sorted(set(result.row) - names)
    status = result.row.get("status")
    required = names - {"schema_version", *CROSS_CELL_FLAGS} if status == "ok" else ERROR_ROW_COLUMNS
    missing = sorted(required - set(result.row))
    if unknown or missing or status not in ("ok", "error"):
        raise ValueError(
            f"cell row {result.row.get('cell_id', '?')} does not match the cells schema (status {status!r}): "
            f"unknown columns {unknown}, missing columns {missing}; add new columns to the schema in storage.py"
        )
    if result.samples and set(result.samples) != set(SAMPLE_SCHEMA.names):
        raise ValueError(f"samples columns {sorted(result.samples)} are not the schema's {SAMPLE_SCHEMA.names}")


def describe_schema() -> Iterator[tuple[str, str, str, str]]:
    """(table, column, type, meaning) for every column: the documented schema."""
    for table, columns in (("cells", _CELL_COLUMNS), ("samples", _SAMPLE_COLUMNS)):
        for name, dtype, doc in columns:
            yield table, name, str(dtype), doc


def set_aside(path: Path) -> Path:
    """Rename a damaged file to ``_<name>.damaged`` (``.damaged.1``, ... if taken); return the new path."""
    target = path.with_name(f"_{path.name}.damaged")
    count = 0
    while target.exists():
        count += 1
        target = path.with_name(f"_{path.name}.damaged.{count}")
    path.rename(target)
    return target


def warn_damaged(file: DamagedFile) -> None:
    """Warn that ``file`` was skipped, in one line that says what to do about it."""
    _warn(f"{file.describe()}: skipped (restore it, or resume the run with `robench run` to recompute the cell)")


def _warn(message: str) -> None:
    warnings.warn(DamagedFileWarning(message), stacklevel=2)


def _warned(read: tuple[pd.DataFrame, list[DamagedFile]]) -> pd.DataFrame:
    for file in read[1]:
        warn_damaged(file)
    return read[0]


def _read_folder(folder: Path, schema: pa.Schema) -> tuple[pd.DataFrame, list[DamagedFile]]:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []
    damaged: list[DamagedFile] = []
    try:
        # One dataset read: fast, and it fills the columns older files lack with nulls.
        table = pq.ParquetDataset(files, schema=schema).read() if files else schema.empty_table()
    except (pa.ArrowException, OSError):
        # Only now look at each file: the healthy folder's read stays one call.
        damaged = [d for d in map(_damage, files) if d is not None]
        if not damaged:
            raise  # not a damaged file (e.g. another schema): the caller reports it
        good = [p for p in files if p not in {d.path for d in damaged}]
        table = pq.ParquetDataset(good, schema=schema).read() if good else schema.empty_table()
    frame: pd.DataFrame = table.to_pandas()
    return frame, damaged


def _damage(path: Path) -> DamagedFile | None:
    """Why ``path`` cannot be read as a parquet file, or None if it can."""
    try:
        with pq.ParquetFile(path) as handle:
            handle.read()
    except (pa.ArrowException, OSError) as exc:
        return DamagedFile(path, " ".join(f"{type(exc).__name__}: {exc}".split()))
    return None
