"""Bad input gets a one-line error before any compute, or a warning that names the bad file.

A file where a folder belongs, a ``-k`` that selects nothing, more samples than the test
split holds, an incomplete dataset folder the user named, a damaged parquet file in a run
folder. All on the tiny synthetic dataset or on small files written here, so each test
takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pluggy
import pyarrow.parquet as pq
import pytest
from conftest import Shell
from test_datasets import cifar10_folder, tiny_fashion

from robench import cli
from robench.context import Progress
from robench.discover.manager import get_plugin_manager
from robench.errors import DamagedFileWarning, DataNotFoundError
from robench.execute.runner import Summary, run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.plugins import cifar, fashion_mnist
from robench.plugins.cifar import CIFAR10
from robench.plugins.fashion_mnist import FashionMNIST
from robench.results.report import write_report
from robench.results.storage import CELL_SCHEMA, RunStore
from robench.testing import TinyPlugin

TINY_ARGS = ["--dataset", "tiny", "--arch", "tinynet", "-D", "epochs=1", "-A", "steps=2", "-A", "restarts=1"]
"""A one-cell grid on the tiny dataset (96 test images): about a second on a CPU."""
TRUNCATED = "ArrowInvalid: Parquet magic bytes not found in footer"


class Recorder(Progress):
    """Keeps the runner's progress lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        """Record one line."""
        self.lines.append(message)


@pytest.fixture
def pm(monkeypatch: pytest.MonkeyPatch) -> pluggy.PluginManager:
    """The built-ins plus the tiny dataset, also behind the ``robench`` command."""
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    monkeypatch.setattr(cli, "default_plugin_manager", lambda: manager)
    return manager


def tiny_benchmark(n_samples: int = 40) -> Benchmark:
    """Two cells (eps 0.2 and 0.3) of one tiny model."""
    return Benchmark(
        name="tiny",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("baseline", {"epochs": 1}),),
        attacks=(PluginSpec.of("pgd", {"steps": 2, "restarts": 1}),),
        eps=(0.2, 0.3),
        n_samples=n_samples,
    )


def run_tiny(pm: pluggy.PluginManager, tmp: Path, progress: Progress | None = None) -> Summary:
    return run(tiny_benchmark(), pm=pm, run_dir=tmp / "run", cache_dir=tmp / "cache", device="cpu", progress=progress)


def truncate(path: Path) -> None:
    """Cut a file in half, as a copy that stopped short leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def error_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("error:")]


# -- 1. a file where a folder belongs ---------------------------------------------------


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_a_file_given_as_a_folder_is_a_one_line_error(
    pm: pluggy.PluginManager, tmp_path: Path, shell: Shell, flag: str
) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    folders = {"--out": str(tmp_path / "run"), "--cache-dir": str(tmp_path / "cache"), flag: str(afile)}
    code, printed = shell(["run", *TINY_ARGS, "--out", folders["--out"], "--cache-dir", folders["--cache-dir"]])
    assert code == 2 and "Traceback" not in printed
    assert printed.strip().count("\n") == 0  # one line, nothing computed before it
    assert printed.startswith(f"error: {flag} {afile} is a file, but robench needs ")
    assert printed.rstrip().endswith("the path of a folder (it is created if missing)")
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_folder_under_a_file_is_refused_too(pm: pluggy.PluginManager, tmp_path: Path, shell: Shell) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    code, printed = shell(["run", *TINY_ARGS, "--out", str(afile / "run"), "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "Traceback" not in printed
    assert error_lines(printed) == [
        f"error: --out {afile / 'run'}: {afile} is a file, so a run folder cannot be created under it; "
        "give --out the path of a folder (it is created if missing)"
    ]


# -- 2. -k that selects nothing ---------------------------------------------------------


def test_a_pattern_that_matches_no_cell_is_an_error_and_writes_nothing(
    pm: pluggy.PluginManager, tmp_path: Path, shell: Shell
) -> None:
    out = tmp_path / "run"
    code, printed = shell(["run", *TINY_ARGS, "-k", "advt", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "Traceback" not in printed and "(no cells)" not in printed
    assert error_lines(printed) == [
        "error: -k 'advt' matches none of the 1 cell(s) of this benchmark; `robench plan` without -k lists their ids"
    ]
    assert not out.exists() and not (tmp_path / "c").exists()
    code, printed = shell(["plan", *TINY_ARGS, "-k", "advt"])  # the same answer from plan
    assert code == 2 and error_lines(printed)[0].startswith("error: -k 'advt' matches none of the 1 cell(s)")


# -- 3. more samples than the test split holds --------------------------------------------


def test_more_samples_than_the_test_split_is_refused(pm: pluggy.PluginManager, tmp_path: Path, shell: Shell) -> None:
    out = tmp_path / "run"
    args = ["run", *TINY_ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    code, printed = shell([*args, "--n-samples", "200"])
    assert code == 2 and "Traceback" not in printed
    assert error_lines(printed) == [
        "error: --n-samples 200 is more than tiny's 96 test images; use at most 96 "
        "(96 evaluates the whole test split; in a benchmark file: [evaluation] n_samples)"
    ]
    assert not out.exists() and not (tmp_path / "c").exists()  # nothing trained, nothing written


def test_the_split_size_evaluates_the_whole_split_and_the_manifest_names_the_data(
    pm: pluggy.PluginManager, tmp_path: Path, shell: Shell
) -> None:
    out = tmp_path / "run"
    code, printed = shell(["run", *TINY_ARGS, "--n-samples", "96", "--out", str(out), "--cache-dir", str(tmp_path)])
    assert code == 0, printed
    assert "data: tiny from generated in memory" in printed.splitlines()
    assert RunStore(out).read_cells()["n"].tolist() == [96]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"] == {"tiny": "generated in memory"}
    assert manifest["eval_indices"]["tiny"] == list(range(96))


# -- 4. an incomplete dataset folder the user named ---------------------------------------


@pytest.fixture
def debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A complete Debian copy of (tiny) Fashion-MNIST, a cache under tmp_path, downloads failing."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(cifar, "CACHE_DIR", tmp_path / "cache")

    def offline(*args: object) -> None:
        raise AssertionError(f"no download may be tried: {args}")

    monkeypatch.setattr(fashion_mnist, "_download", offline)
    monkeypatch.setattr(cifar, "_download", offline)
    tiny_fashion(tmp_path / "debian", gz=True, seed=1)
    return tmp_path / "debian"


def only_train_files(folder: Path) -> None:
    """A Fashion-MNIST folder holding the two training files and not the test ones."""
    tiny_fashion(folder, gz=True, seed=2)
    for stem in fashion_mnist.FILES["test"]:
        (folder / f"{stem}.gz").unlink()


@pytest.mark.parametrize("layout", [("fashion-mnist",), ("FashionMNIST", "raw")])
def test_an_incomplete_robench_data_folder_is_an_error_not_the_debian_copy(
    debian: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: tuple[str, ...]
) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("ROBENCH_DATA", str(data))
    only_train_files(data.joinpath(*layout))
    with pytest.raises(DataNotFoundError) as info:
        FashionMNIST().locate()
    message = str(info.value)
    assert message.startswith("Fashion-MNIST in $ROBENCH_DATA is incomplete:\n")
    assert f"{data.joinpath(*layout)} ($ROBENCH_DATA" in message
    assert "lacks t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)" in message
    assert "train-images" not in message.split("lacks", 1)[1].split("\n")[0]
    assert "add the missing idx files there" in message and "remove the incomplete folder" in message
    assert str(debian) not in message  # never looked at: the user named their folder


def test_the_incomplete_folder_stops_the_run_before_any_compute(
    debian: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell: Shell
) -> None:
    monkeypatch.setenv("ROBENCH_DATA", str(tmp_path / "data"))
    only_train_files(tmp_path / "data" / "fashion-mnist")
    code, printed = shell(["run", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "Traceback" not in printed
    assert "error: Fashion-MNIST in $ROBENCH_DATA is incomplete:" in printed
    assert "t10k-labels-idx1-ubyte(.gz)" in printed
    assert not (tmp_path / "run").exists()


def test_robench_data_without_a_fashion_folder_still_falls_through(
    debian: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBENCH_DATA", str(tmp_path / "data"))
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # other datasets' folders do not count
    assert FashionMNIST().locate() == f"{debian} (Debian package dataset-fashion-mnist)"
    # and a complete folder of either layout wins over an incomplete one of the other
    only_train_files(tmp_path / "data" / "fashion-mnist")
    tiny_fashion(tmp_path / "data" / "FashionMNIST" / "raw", gz=False, seed=3)
    assert "torchvision layout" in FashionMNIST().locate()


def test_an_incomplete_cifar_folder_in_robench_data_is_an_error_not_a_download(
    debian: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("ROBENCH_DATA", str(data))
    cifar10_folder(data / "cifar-10-batches-py")
    (data / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataNotFoundError) as info:  # the patched download would raise AssertionError
        CIFAR10().locate()
    assert str(info.value).startswith(
        f"cifar10 in $ROBENCH_DATA is incomplete: {data / 'cifar-10-batches-py'} lacks test_batch. "
    )


# -- 5. a damaged file in a run folder ------------------------------------------------------


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-cell run (``run/``) and its model cache (``cache/``), built once."""
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    folder = tmp_path_factory.mktemp("source")
    run_tiny(manager, folder)
    return folder


@pytest.fixture
def finished_run(source_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of :func:`source_run` per test, so each may damage it."""
    shutil.copytree(source_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


def cell_files(run_dir: Path, table: str = "cells") -> list[Path]:
    return sorted((run_dir / table).glob("*.parquet"))


def test_show_names_the_damaged_file_and_prints_the_rest(finished_run: Path, shell: Shell) -> None:
    damaged = cell_files(finished_run / "run")[0]
    truncate(damaged)
    code, printed = shell(["show", str(finished_run / "run")])
    assert code == 0 and "Traceback" not in printed
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: damaged cell file {damaged} ({TRUNCATED}. Either the file is corrupted or this is not a "
        "parquet file.): skipped (restore it, or resume the run with `robench run` to recompute the cell)"
    ]
    assert [line.split()[:3] for line in printed.splitlines() if line.startswith("   tiny")] == [
        ["tiny", "tinynet", "baseline"]
    ]  # the other cell is still shown


def test_resume_sets_the_damaged_file_aside_and_recomputes_its_cell(
    pm: pluggy.PluginManager, finished_run: Path
) -> None:
    before = RunStore(finished_run / "run").read_cells().sort_values("cell_id")
    damaged = cell_files(finished_run / "run")[0]
    truncate(damaged)
    progress = Recorder()
    summary = run_tiny(pm, finished_run, progress)
    aside = damaged.with_name(f"_{damaged.name}.damaged")
    assert progress.lines[1] == (
        f"damaged cell file {damaged} ({TRUNCATED}. Either the file is corrupted or this is not a parquet "
        f"file.): moved to {aside.name}; the cell will be recomputed"
    )
    assert summary.skipped == 1 and len(summary.results) == 2 and aside.is_file()
    after = RunStore(finished_run / "run").read_cells().sort_values("cell_id")
    columns = ["cell_id", "n", "clean_acc", "robust_acc"]
    assert after[columns].reset_index(drop=True).equals(before[columns].reset_index(drop=True))
    # the folder still reads as one parquet dataset: pyarrow skips the _-prefixed file
    assert pq.read_table(finished_run / "run" / "cells").num_rows == 2
    truncate(damaged)  # damaged again: the next name gets a counter
    run_tiny(pm, finished_run)
    assert damaged.with_name(f"_{damaged.name}.damaged.1").is_file()


def test_a_damaged_samples_file_makes_its_cell_unfinished(pm: pluggy.PluginManager, finished_run: Path) -> None:
    damaged = cell_files(finished_run / "run", "samples")[1]
    truncate(damaged)
    progress = Recorder()
    summary = run_tiny(pm, finished_run, progress)
    assert f"damaged samples file {damaged} ({TRUNCATED}" in progress.lines[1]
    assert summary.skipped == 1 and damaged.is_file()  # recomputed and written again
    assert damaged.with_name(f"_{damaged.name}.damaged").is_file()
    keys = {p.stem for p in cell_files(finished_run / "run")}
    assert set(RunStore(finished_run / "run").read_samples()["cell_key"]) == keys  # both cells' samples again


def test_samples_set_aside_by_an_interrupted_resume_still_count_as_unfinished(finished_run: Path) -> None:
    store = RunStore(finished_run / "run")
    samples = cell_files(store.path, "samples")[0]
    samples.rename(samples.with_name(f"_{samples.name}.damaged"))  # moved aside, then the run was killed
    lines: list[str] = []
    done = store.finished(lines.append)
    assert samples.stem not in done and len(done) == 1
    assert lines == [
        f"samples file of cell {store.read_cells().set_index('cell_key').loc[samples.stem, 'cell_id']} "
        "was set aside as damaged; the cell will be recomputed"
    ]
    shutil.rmtree(store.path / "samples")  # a folder written without samples stays finished
    assert len(store.finished()) == 2


def test_check_counts_a_damaged_cell_as_missing(finished_run: Path, shell: Shell) -> None:
    run_dir, baseline = finished_run / "run", finished_run / "baseline"
    shutil.copytree(run_dir, baseline)
    damaged = cell_files(run_dir)[0]
    truncate(damaged)
    code, printed = shell(["check", str(run_dir), "--baseline", str(baseline)])
    assert code == 1 and "Traceback" not in printed
    assert [line for line in printed.splitlines() if line.startswith("warning:")] == [
        f"warning: damaged cell file {damaged} ({TRUNCATED}. Either the file is corrupted or this is not a "
        "parquet file.): skipped (restore it, or resume the run with `robench run` to recompute the cell)"
    ]
    assert "missing: in the baseline; the run's cell file is damaged" in printed
    assert "check: 1 passed, 1 failed" in printed
    # a damaged baseline file fails the gate too (its cell would otherwise pass as new)
    shutil.copy(cell_files(baseline)[0], cell_files(run_dir)[0])
    truncate(cell_files(baseline)[1])
    code, printed = shell(["check", str(run_dir), "--baseline", str(baseline)])
    assert code == 1 and "missing: the baseline's damaged cell file" in printed
    assert "check: 1 passed, 1 failed, 1 skipped" in printed


def test_report_names_the_damaged_file_and_reports_the_rest(finished_run: Path) -> None:
    truncate(cell_files(finished_run / "run")[0])
    with pytest.warns(DamagedFileWarning, match="damaged cell file"):
        written = write_report(finished_run / "run")
    assert written[0].name == "report.md" and "eps" in written[0].read_text()


@pytest.mark.parametrize("folder", ["results/baselines/ci", "results/reproductions/eio-fashion-smoke-cpu"])
def test_old_folders_read_every_column_with_or_without_a_damaged_file(tmp_path: Path, folder: str) -> None:
    committed = Path(__file__).resolve().parents[1] / folder
    whole = RunStore(committed).read_cells()
    assert list(whole.columns) == CELL_SCHEMA.names
    written = set(pq.read_schema(cell_files(committed)[0]).names)
    newer = [name for name in CELL_SCHEMA.names if name not in written]
    assert whole[newer].isna().all().all()  # columns newer than the folder read as missing
    shutil.copytree(committed / "cells", tmp_path / "cells")
    truncate(cell_files(tmp_path)[0])
    with pytest.warns(DamagedFileWarning):
        rest = RunStore(tmp_path).read_cells()
    assert list(rest.columns) == CELL_SCHEMA.names and len(rest) == len(whole) - 1
    expected = whole[whole["cell_key"] != cell_files(tmp_path)[0].stem].reset_index(drop=True)
    assert rest.reset_index(drop=True).equals(expected)
    assert np.array_equal(rest.dtypes.to_numpy(), whole.dtypes.to_numpy())
