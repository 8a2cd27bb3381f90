"""Executor settings (issue 15): flags and a benchmark file's [execution] table, checked
before any compute; they change no number, so neither the config hash nor the run folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import Shell

from robench.errors import ConfigError
from robench.plan.benchfile import load_benchmark
from robench.plan.execution import Execution, execution_from_table, with_overrides

GRID = """
[grid]
defense = ["baseline"]
attack = ["pgd"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bench.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_execution_table_parses_and_leaves_the_config_hash_alone(tmp_path: Path) -> None:
    plain = load_benchmark(write(tmp_path, GRID))
    table = '[execution]\nexecutor = "ray"\naddress = "auto"\ngpus_per_task = 1\ncpus_per_task = 4\nmax_retries = 5\n'
    ray = load_benchmark(write(tmp_path, GRID + table))
    assert ray.execution == Execution("ray", "auto", 1.0, 4, 5)
    assert plain.execution == Execution()
    assert ray.config_hash() == plain.config_hash() and ray.to_json() == plain.to_json()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"executor": "rey"}, "unknown executor 'rey'. Did you mean: ray?"),
        ({"exector": "ray"}, "[execution] key 'exector' is unknown. Did you mean: executor?"),
        ({"executor": "ray", "cpus_per_task": 1.5}, "[execution] cpus_per_task must be an integer, got 1.5"),
        ({"address": "auto"}, "address only apply to the ray executor"),
        ({"executor": "ray", "gpus_per_task": -1}, "must be >= 0"),
    ],
)
def test_bad_execution_settings_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        execution_from_table(table)
    assert message in str(info.value)


def test_flags_override_the_file_and_local_drops_its_ray_settings() -> None:
    file = Execution("ray", "auto", 1.0, 4)
    assert with_overrides(file, cpus_per_task=2, executor=None) == Execution("ray", "auto", 1.0, 2)
    assert with_overrides(file, executor="local") == Execution()
    with pytest.raises(ConfigError, match="only apply to the ray executor"):
        with_overrides(Execution(), gpus_per_task=1.0)


def test_cli_execution_errors_come_before_any_compute(shell: Shell) -> None:
    code, printed = shell(["run", "--defense", "baseline", "--attack", "pgd", "--address", "auto"])
    assert code == 2 and "address only apply to the ray executor; add --executor ray" in printed
    code, printed = shell(["run", "--help"])
    assert code == 0 and "--executor [local|ray]" in printed and "--gpus-per-task" in printed
