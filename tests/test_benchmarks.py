"""Benchmarks that cannot rot: every script under benchmarks/ runs, on a tiny setting, in CI.

Nothing imports the scripts, so a change to robench that breaks one (two once crashed when
``Session`` stopped taking the plugin manager) went unnoticed. This finds every
``benchmarks/*.py`` (a script added later is covered without a change here; modules named
``_*.py`` are shared helpers, not scripts) and runs it as a user would, ``python
benchmarks/NAME.py --smoke``, in its own process, with a fresh cache. ``--smoke`` is each
script's tiny but real path (tiny trainings, a few samples and steps). mypy covers
benchmarks/ too (pyproject.toml).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
SMOKE_SECONDS = 600  # per script; on 2 idle cores each takes seconds to about half a minute


def test_the_scripts_are_found_and_type_checked() -> None:
    assert {"perf_eval.py", "autoattack_reference.py", "eot_curve.py"} <= {p.name for p in SCRIPTS}
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "benchmarks" in mypy["files"]


@pytest.fixture(scope="module")
def fashion_mnist() -> None:
    from robench.errors import DataNotFoundError
    from robench.plugins.fashion_mnist import FashionMNIST

    try:
        FashionMNIST().locate()
    except DataNotFoundError as exc:  # pragma: no cover - the CI machines carry it
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_runs_its_smoke_setting(script: Path, tmp_path: Path, fashion_mnist: None) -> None:
    if "--smoke" not in script.read_text():
        pytest.fail(
            f"benchmarks/{script.name} has no --smoke flag. Every benchmark script must accept --smoke and then "
            "run a tiny but real setting (a few samples, tiny trainings) in seconds: tests/test_benchmarks.py "
            "runs each one that way so that a change that breaks it fails CI"
        )
    # TMPDIR too, so that what a script leaves in temporary folders is removed with it. A short
    # one: Ray puts its sockets under it, and a socket path may not exceed 107 bytes.
    scratch = tempfile.mkdtemp(prefix="rb-")
    env = {**os.environ, "ROBENCH_CACHE": str(tmp_path / "cache"), "TMPDIR": scratch, "PYTHONHASHSEED": "0"}
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--smoke"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=SMOKE_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"benchmarks/{script.name} --smoke ran longer than {SMOKE_SECONDS} s: {exc.stdout!r}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    assert done.returncode == 0, f"benchmarks/{script.name} --smoke exited {done.returncode}:\n{tail}"
    assert done.stdout.strip(), f"benchmarks/{script.name} --smoke printed nothing"
